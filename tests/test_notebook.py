"""experiments/notebooks/getting_started.ipynb runs top to bottom in a fresh kernel (small mode),
and its cells show what they say: the results table, plots, predictions, a loss going down, a
student of the user's own network."""

import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "getting_started.ipynb")
TRAIN = "results = train.train_and_evaluate(config, WORKDIR)"  # the demo's run


def _text(cell):
  """Everything a code cell printed or returned as text."""
  out = []
  for o in cell.get("outputs", []):
    if o["output_type"] == "stream":
      out.append(o["text"])
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


def _images(cell):
  return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _cell(nb, marker):
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
  return cell


def test_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  root = tmp_path_factory.mktemp("notebook")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # A kernel of this interpreter, whatever kernels the machine's Jupyter paths hold.
  spec = root / "jupyter" / "kernels" / "jaxkd-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps(dict(
      argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      display_name="jaxkd test", language="python")))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
    # The kernel inherits this environment: small mode, its workdir and digits outside the
    # checkout and the home folder, and one CPU device, as on Colab's CPU runtime.
    patch.setenv("JAXKD_NOTEBOOK_SMALL", "1")
    patch.setenv("JAXKD_NOTEBOOK_WORKDIR", str(root / "runs"))
    patch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))
    patch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="jaxkd-test",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
  return nb, root


def test_runs_and_trains_the_demo(executed):
  nb, root = executed
  assert "(small mode)" in _text(_cell(nb, "IN_COLAB = "))
  table = _text(_cell(nb, TRAIN))
  for line in ("stage", "teacher ", "student_kd ", "student_ce "):
    assert re.search(rf"^{line}", table, re.M), table
  kd_line = re.search(r"^student_kd\s+resnet8\s+kd\s+(\d+\.\d\d).*$", table, re.M)
  assert 0.0 <= float(kd_line.group(1)) <= 100.0
  # The table is printed once: the next cell shows the records' other fields.
  assert sum(_text(c).count(kd_line.group(0)) for c in nb.cells if c.cell_type == "code") == 1
  records = _text(_cell(nb, "student_kd record:"))
  assert re.search(r"^student_kd\s+\d+ steps in\s+\d+\.\d s, file: student_kd/student\.msgpack$",
                   records, re.M), records
  assert os.path.isfile(root / "runs" / "student_kd" / "student.msgpack")
  # Colab only: the test kernel prints the command instead.
  assert _text(_cell(nb, "%tensorboard")).strip() == f"tensorboard --logdir {root / 'runs'}"


def test_plots_the_curves_and_the_students_predictions(executed):
  nb, _ = executed
  assert _images(_cell(nb, "metrics_log.read(")) == 1
  predictions = _cell(nb, "evaluate.load_network(")
  assert _images(predictions) == 1
  # The loaded student scores what its stage recorded as its last evaluation.
  table = _text(_cell(nb, TRAIN))
  recorded = re.search(r"^student_kd\s+resnet8\s+kd\s+(\d+\.\d\d)", table, re.M).group(1)
  assert f"test digits: top-1 {recorded}," in _text(predictions)


def test_hand_written_loop_lowers_the_sskd_loss(executed):
  nb, _ = executed
  cell = _cell(nb, "sskd.sskd_loss(")
  first, last = map(float, re.search(r"SSKD loss: (\S+) at step 0, (\S+) at step 99",
                                     _text(cell)).groups())
  assert last < 0.5 * first
  assert _images(cell) == 1


def test_distils_into_a_registered_network(executed):
  nb, root = executed
  text = _text(_cell(nb, "models.register("))
  assert re.search(r"^student_kd\s+my_net\s+kd\s+\d+\.\d\d", text, re.M), text
  # The teacher came from the first run's file, not from a second training.
  assert re.search(r"^teacher\s+resnet20\s+imported", text, re.M), text
  assert not os.path.exists(root / "runs_my_net" / "teacher" / "checkpoints")
