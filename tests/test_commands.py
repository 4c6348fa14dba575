"""What jaxkd's commands print, as a user runs them: a demo run only jaxkd's own lines (none of
TensorFlow's, absl's or tfds' start-up notices, warnings or progress bars, the digits built on
first use included); `--help` exits 0; a flag mistake is one `error:` line and exit status 2."""

import os
import re
import subprocess
import sys

import pytest

import helpers

# The shapes of every line `python -m jaxkd.main` prints on a run.
JAXKD_LINES = (
    r"\[\w+\] .+",                                    # a stage's progress and eval lines
    r"dataset \w+: .+",                               # a dataset built or its statistics
    r"stage +model +method +top-1 last +top-1 best +top-5 last",  # the closing table
    r"[- ]+",
    r"\w+ +\w+ +\w+ +[\d.]+ +[\d.]+ +[\d.]+ *",
    r"",
    r"logs \(TensorBoard\): tensorboard --logdir .+",
    r"checkpoints: .+/<stage>/checkpoints; results: .+/<stage>/result\.json",
)


def _popen(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # What a user's shell has: nothing set.
  return subprocess.Popen([sys.executable, "-m", *args], cwd=helpers.REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_demo_run_prints_only_jaxkds_lines(tmp_path):
  """The demo at runlocal size (KD and SSKD), its digits built in a fresh data_dir."""
  proc = _popen("jaxkd.main", "--config", "configs/demo.py:runlocal", "--workdir",
                str(tmp_path / "run"), f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                "--config.baselines=sskd")
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert err == ""
  others = [line for line in out.splitlines()
            if not any(re.fullmatch(shape, line) for shape in JAXKD_LINES)]
  assert others == []
  assert "dataset digits: building tfds 'sklearn_digits'" in out  # not tfds' own lines
  assert re.search(r"^student_sskd +resnet8 +sskd ", out, re.M)


COMMANDS = {
    # Help: absl's, exit status 0.
    "main_help": (("jaxkd.main", "--help"), 0, "--workdir"),
    "main_helpfull": (("jaxkd.main", "--helpfull"), 0, "--workdir"),
    "evaluate_help": (("jaxkd.evaluate", "--help"), 0, "--checkpoint"),
    "import_help": (("jaxkd.import_teacher", "--help"), 0, "--arch"),
    "export_help": (("jaxkd.export_student", "--help"), 0, "--variables"),
    # Flag mistakes: one line, exit status 2.
    "main_unknown_flag": (("jaxkd.main", "--config", "configs/demo.py", "--bogus=1"), 2,
                          "error: Unknown command line flag 'bogus'"),
    "import_without_out": (("jaxkd.import_teacher", "--arch", "resnet8", "x.pth"), 2,
                           "error: flag --out=None: Flag --out must have a value other than "
                           "None."),
    "import_without_file": (("jaxkd.import_teacher", "--arch=resnet8", "--out=t.msgpack"), 2,
                            "error: missing arguments; give exactly one PyTorch checkpoint path"),
    "import_wrong_type": (("jaxkd.import_teacher", "--arch=resnet8", "--out=t.msgpack",
                           "--num_classes=abc", "x.pth"), 2,
                          "error: flag --num_classes=abc: invalid literal for int() with base "
                          "10: 'abc'"),
    "export_without_variables": (("jaxkd.export_student", "--model=resnet8", "--out=s"), 2,
                                 "error: flag --variables=None: Flag --variables must have a "
                                 "value other than None."),
    "export_extra_argument": (("jaxkd.export_student", "--model=resnet8", "--variables=v",
                               "--out=s", "extra"), 2, "error: unexpected arguments: extra"),
    "export_missing_file": (("jaxkd.export_student", "--model=resnet8", "--variables=none.msgpack",
                             "--out=s"), 2,
                            "error: variables file 'none.msgpack' does not exist"),
}


@pytest.fixture(scope="module")
def answers():
  """Every command of COMMANDS, run at once: {name: (exit status, stdout, stderr)}."""
  procs = {name: _popen(*args) for name, (args, _, _) in COMMANDS.items()}
  outputs = {name: proc.communicate(timeout=600) for name, proc in procs.items()}
  return {name: (procs[name].returncode,) + outputs[name] for name in procs}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_exits_0_and_flag_mistakes_are_one_line(answers, name):
  _, status, text = COMMANDS[name]
  returncode, out, err = answers[name]
  assert returncode == status, err[-3000:]
  if status == 0:
    assert text in out and "Try --helpfull" not in err
  else:
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(text), err
