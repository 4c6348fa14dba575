"""`python -m jaxkd.evaluate`: a network file's top-1 / top-5 on a dataset's eval split, as the
trainer's own evaluation gives them, the model and dataset of a workdir stage read from its
saved config, and one-line errors for bad input."""

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

import helpers

from jaxkd import checkpoint
from jaxkd import evaluate
from jaxkd import evaluation
from jaxkd import networks
from jaxkd import parallel
from jaxkd import steps
from jaxkd.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **fields):
  config = evaluate.default_config()
  config.dataset.update(name="digits", data_dir=data_dir)
  config.update({"eval_batch_size": 120, **fields})
  return config


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_dir):
  """A resnet8 for the digits with freshly initialised variables, as a jaxkd variables file,
  and what `jaxkd.evaluation.evaluate` gives for it in this process."""
  data_dir = str(digits_dir)
  path = str(tmp_path_factory.mktemp("evaluate") / "resnet8.msgpack")
  mesh = parallel.create_mesh()
  network = networks.build_network("resnet8", 10)
  variables = networks.init_variables(network, (8, 8, 1), seed=3, mesh=mesh)
  checkpoint.export_variables(path, variables)
  scores = evaluation.evaluate(network, variables, _config(data_dir), mesh,
                         jax.jit(functools.partial(steps.eval_step, network=network)))
  return data_dir, path, scores


def _run(*args, devices=2):
  env = helpers.device_env(devices)
  return subprocess.run([sys.executable, "-m", "jaxkd.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_command_prints_the_trainers_top1_and_top5(exported):
  data_dir, path, scores = exported
  # Another device count than this process's 4: the counts do not depend on it.
  done = _run("--model=resnet8", f"--checkpoint={path}", "--config.dataset.name=digits",
              f"--config.dataset.data_dir={data_dir}", "--config.eval_batch_size=120")
  assert done.returncode == 0, done.stderr[-3000:]
  found = re.search(r"on digits test \(360 images\): top-1 (\d+\.\d\d)  top-5 (\d+\.\d\d)",
                    done.stdout)
  assert found, done.stdout
  assert found.group(1) == f"{scores['top1']:.2f}"
  assert found.group(2) == f"{scores['top5']:.2f}"


def test_bad_checkpoint_is_one_line_and_exit_status_2(exported, tmp_path):
  data_dir, _, _ = exported
  done = _run("--model=resnet8", f"--checkpoint={tmp_path / 'none.msgpack'}",
              "--config.dataset.name=digits", f"--config.dataset.data_dir={data_dir}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: resnet8 checkpoint '{tmp_path / 'none.msgpack'}' does not exist")
  assert "Traceback" not in done.stderr and not done.stdout


@pytest.mark.parametrize("args,line", [
    (["--model=resnet8", "--checkpoint=x", "--config.dataset.nme=digits"],
     "error: --config.dataset.nme: the config has no field 'dataset.nme'; did you mean "
     "--config.dataset.name?"),
    (["--model=resnet8", "--checkpoint=x", "--config.eval_batch_size=abc"],
     "error: flag --config.eval_batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    (["--checkpoint=x"], "error: --model is required: 'x' lies in no workdir stage (no "
                         "config.json beside it) to read the network from; e.g. --model=resnet8"),
    (["--model=resnet8"], "error: flag --checkpoint=None: Flag --checkpoint must have a value "
                          "other than None."),
    (["--model=resnet8", "--checkpoint=x", "extra"], "error: unexpected arguments: extra"),
])
def test_flag_mistakes_are_one_line_and_exit_status_2(args, line):
  done = _run(*args)
  assert (done.returncode, done.stdout, done.stderr.strip()) == (2, "", line)


@pytest.mark.parametrize("model,fields,message", [
    ("resnet_nope", {}, "unknown model 'resnet_nope'; valid names: .*resnet8"),
    # resnet14 has two blocks per stage, the file's resnet8 one.
    ("resnet14", {}, "resnet14 checkpoint .* does not fit the architecture: missing leaf "
                     "'batch_stats/backbone/layer1_1/bn1/mean'"),
    ("resnet8", {"eval_batch_size": 6}, "batch size 6 does not divide over 4 devices"),
])
def test_bad_input_is_refused_by_name(exported, model, fields, message):
  data_dir, path, _ = exported
  with pytest.raises(UserError, match=message):
    evaluate.evaluate_file(model, path, _config(data_dir, **fields))


def test_a_dataset_that_is_not_prepared_is_refused(exported, tmp_path):
  _, path, _ = exported
  config = _config(str(tmp_path / "empty"))
  config.dataset.name = "cifar10"
  with pytest.raises(UserError, match="dataset 'cifar10' .* is not prepared in data_dir"):
    evaluate.evaluate_file("resnet8", path, config)


def test_half_precision_scores_the_same_network(exported):
  """bfloat16 compute on the same file: a few of 360 predictions may flip, not more."""
  data_dir, path, scores = exported
  half = evaluate.evaluate_file("resnet8", path, _config(data_dir, half_precision=True))
  assert half["count"] == 360
  assert abs(half["top1"] - scores["top1"]) <= 3 * 100 / 360


def test_progress_lines_come_only_after_their_interval():
  stream = io.StringIO()
  fn = evaluate.with_progress(lambda x: x + 1, total=3, stream=stream, interval_s=0.0)
  assert [fn(i) for i in range(3)] == [1, 2, 3]
  lines = stream.getvalue().splitlines()
  assert [line.split(",")[0] for line in lines] == [f"[eval] batch {i}/3" for i in (1, 2, 3)]
  assert lines[-1].endswith("about 0s left")
  quiet = io.StringIO()
  evaluate.with_progress(lambda x: x, total=3, stream=quiet, interval_s=60.0)(0)
  assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def stage_file(exported, tmp_path_factory):
  """The exported file inside a workdir stage, beside the config.json a digits run saves there
  (its model, and the run's dataset fields)."""
  data_dir, path, _ = exported
  stage_dir = tmp_path_factory.mktemp("workdir") / "student_kd"
  stage_dir.mkdir()
  shutil.copy(path, stage_dir / "student.msgpack")
  dataset = dict(_config(data_dir).dataset.to_dict(), mean=[], std=[], num_eval_examples=-1)
  (stage_dir / "config.json").write_text(json.dumps(
      {"effective": {"model": "resnet8", "method": "kd", "dataset.name": "digits"},
       "history": [], "run": {"dataset": dataset, "eval_batch_size": 16}}))
  return str(stage_dir / "student.msgpack")


def test_a_stage_file_brings_its_model_and_dataset(stage_file):
  default = evaluate.default_config()
  model, config = evaluate.model_and_config(None, stage_file, default, given=[])
  assert (model, config.dataset.name, config.dataset.mean) == ("resnet8", "digits", ())
  assert config.eval_batch_size == default.eval_batch_size  # Only the dataset is read.
  # The command line wins: a model, a dataset field.
  given = evaluate.default_config()
  given.dataset.eval_split = "train"
  model, config = evaluate.model_and_config("resnet14", stage_file, given,
                                            given=["dataset.eval_split"])
  assert (model, config.dataset.name, config.dataset.eval_split) == ("resnet14", "digits",
                                                                      "train")


def test_command_on_a_stage_file_needs_no_model_or_dataset(exported, stage_file):
  _, _, scores = exported
  done = _run(f"--checkpoint={stage_file}", "--config.eval_batch_size=120")
  assert done.returncode == 0, done.stderr[-3000:]
  # Nothing but the result (and, on a slow machine, a progress line every 10 s).
  assert all(line.startswith("[eval] batch ") for line in done.stderr.splitlines()), done.stderr
  assert done.stdout == (f"resnet8 {stage_file} on digits test (360 images): top-1 "
                         f"{scores['top1']:.2f}  top-5 {scores['top5']:.2f}\n")
