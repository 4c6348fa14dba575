"""Bad command lines end with one line `error: …` and exit status 2, before anything is written.

Each case runs the command line in this process (`jaxkd.main.run`, a fresh absl FlagValues per
call); a few also run `python -m jaxkd.main` itself, to show the real entry point answers the
same, in exactly one line. Every case is refused before a workdir is created (data and teacher
files included), leaves an existing one unchanged, and a refusal after a run created its
workdir removes it unless it holds work.
"""

import dataclasses
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import executor
from jaxkd import main
from jaxkd import paths
from jaxkd import networks
from jaxkd import plan
from jaxkd import train
from jaxkd.data import sources
from jaxkd.errors import UserError
from jaxkd.interop import clip_weights
from jaxkd.interop import torch_checkpoint

DEMO = "configs/demo.py"


@dataclasses.dataclass(frozen=True)
class Case:
  """Extra arguments after `--config configs/demo.py --workdir W` (`config=False`: without the
  --config, `workdir=False`: without the --workdir), and what the error line must contain."""
  args: tuple[str, ...]
  message: str
  config: bool = True
  workdir: bool = True


CASES = {
    # The command line itself.
    "misspelt_field": Case(("--config.optimizer.lrr=0.1",),
                           "no field 'optimizer.lrr'; did you mean --config.optimizer.lr?"),
    "misspelt_section": Case(("--config.optimiser.momentum=0.8",),
                             "did you mean --config.optimizer.momentum?"),
    "missing_config_file": Case(("--config", "configs/nope.py"),
                                "config file 'configs/nope.py' does not exist", config=False),
    "syntax_error": Case(("--config", "{broken}"), "broken.py' line 2: ", config=False),
    "error_in_config_file": Case(("--config", "{raising}"),
                                 "line 3 fails to run: NameError", config=False),
    "unknown_config_argument": Case(("--config", f"{DEMO}:bogus"),
                                    "unknown config argument 'bogus'", config=False),
    "wrong_type": Case(("--config.num_epochs=abc",),
                       "--config.num_epochs=abc: invalid literal for int() with base 10: 'abc'; "
                       "--config.num_epochs takes an integer"),
    "unknown_flag": Case(("--bogus_flag=1",), "Unknown command line flag 'bogus_flag'"),
    "no_config": Case((), "--config is required", config=False),
    "no_workdir": Case((), "--workdir is required", workdir=False),
    "extra_argument": Case(("train",), "unexpected arguments: train"),
    # Names.
    "unknown_model": Case(("--config.student.name=resnet_nope",), "unknown model 'resnet_nope'"),
    "unknown_method": Case(("--config.baselines=ce,kd_nope",), "unknown method 'kd_nope'"),
    "unknown_dataset": Case(("--config.dataset.name=mnist_nope",),
                            "unknown dataset 'mnist_nope'"),
    "unknown_schedule": Case(("--config.schedule.name=poly",), "unknown schedule 'poly'"),
    "teacher_keep": Case(("--config.teacher.keep=middle",), "teacher.keep is 'middle'"),
    # Epochs, learning rates, optimiser.
    "num_epochs_zero": Case(("--config.num_epochs=0",),
                            "num_epochs is 0; it must be an integer >= 1"),
    "teacher_epochs_negative": Case(("--config.teacher.num_epochs=-3",),
                                    "teacher.num_epochs is -3; it must be an integer >= 1"),
    "probe_epochs_zero": Case(("--config.linear_probe.dataset=digits",
                               "--config.linear_probe.num_epochs=0"),
                              "linear_probe.num_epochs is 0; it must be an integer >= 1"),
    "lr_zero": Case(("--config.optimizer.lr=0",), "optimizer.lr is 0.0; it must be a number > 0"),
    "teacher_lr_negative": Case(("--config.teacher.lr=-0.5",),
                                "teacher.lr is -0.5; it must be a number > 0, or -1"),
    "momentum_one": Case(("--config.optimizer.momentum=1.0",),
                         "optimizer.momentum is 1.0; it must be a number in [0, 1)"),
    "weight_decay_negative": Case(("--config.optimizer.weight_decay=-1e-4",),
                                  "optimizer.weight_decay is -0.0001; it must be a number >= 0"),
    "nesterov_without_momentum": Case(("--config.optimizer.nesterov=True",
                                       "--config.optimizer.momentum=0"),
                                      "optimizer.nesterov is True"),
    "seed_negative": Case(("--config.seed=-1",), "seed is -1"),
    # Method hyper-parameters: generic (every method the run trains) and a method's own.
    "temperature_zero": Case(("--config.method.T=0",), "method.T is 0.0; it must be a number > 0"),
    "suffix_T_negative": Case(("--config", "configs/default.py:sskd",
                               "--config.dataset.name=digits", "--config.method.kd_T=-4"),
                              "method.kd_T is -4.0; it must be a number > 0", config=False),
    "temperature_suffix": Case(("--config", "configs/default.py:ega",
                                "--config.dataset.name=digits",
                                "--config.method.nce_temperature=0"),
                               "method.nce_temperature is 0.0", config=False),
    "weight_negative": Case(("--config.method.ce_weight=-0.1",),
                            "method.ce_weight is -0.1; it must be a number >= 0"),
    "baseline_temperature": Case(("--config", "{baseline_T}"),
                                 "method_overrides.hsakd.T is -1.0", config=False),
    "method_tuple_as_string": Case(("--config.method_overrides.sskd.teacher_milestones=abc",),
                                   "method_overrides.sskd.teacher_milestones is ('abc',); it "
                                   "must be a tuple of numbers"),
    "method_own_check": Case(("--config", "configs/default.py:ega",
                              "--config.dataset.name=digits", "--config.method.distill=nope"),
                             "unknown method.distill 'nope'", config=False),
    # Batches, logging and checkpoints.
    "batch_size_zero": Case(("--config.batch_size=0",), "batch_size is 0"),
    "eval_batch_size_zero": Case(("--config.eval_batch_size=0",),
                                 "eval_batch_size is 0; it must be an integer >= 1"),
    "eval_batch_size_indivisible": Case(("--config.eval_batch_size=6",),
                                        "global batch size 6 does not divide over 4 devices; "
                                        "set --config.eval_batch_size to a multiple of 4"),
    "keep_checkpoints_zero": Case(("--config.keep_checkpoints=0",), "keep_checkpoints is 0"),
    "log_every_zero": Case(("--config.log_every_steps=0",), "log_every_steps is 0"),
    "checkpoint_every_negative": Case(("--config.checkpoint_every_steps=-5",),
                                      "checkpoint_every_steps is -5"),
    "eval_every_zero": Case(("--config.eval_every_epochs=0",), "eval_every_epochs is 0"),
    "input_workers_negative": Case(("--config.input_workers=-1",),
                                   "input_workers is -1; it must be an integer >= 0"),
    # Schedule.
    "milestones_decreasing": Case(("--config.schedule.milestones=(11, 9)",),
                                  "schedule.milestones is (11, 9); it must be a tuple of "
                                  "increasing epochs in (0, 15)"),
    "milestones_beyond": Case(("--config.schedule.milestones=(9, 20)",),
                              "schedule.milestones is (9, 20)"),
    "milestones_as_string": Case(("--config.schedule.milestones=abc",),
                                 "schedule.milestones is ('abc',)"),
    "probe_milestones_beyond": Case(("--config.linear_probe.dataset=digits",
                                     "--config.linear_probe.milestones=(50,)"),
                                    "linear_probe.milestones is (50,)"),
    "decay_zero": Case(("--config.schedule.decay=0",), "schedule.decay is 0.0; it must be a "
                                                       "number in (0, 1]"),
    "decay_above_one": Case(("--config.schedule.decay=1.5",), "schedule.decay is 1.5"),
    "warmup_negative": Case(("--config.schedule.warmup_epochs=-1",),
                            "schedule.warmup_epochs is -1"),
    "warmup_all_epochs": Case(("--config.schedule.warmup_epochs=15",),
                              "schedule.warmup_epochs is 15; it must be a number in [0, "
                              "num_epochs)"),
    # Dataset.
    "train_fraction_zero": Case(("--config.dataset.train_fraction=0",),
                                "dataset.train_fraction is 0.0; it must be a number in (0, 1]"),
    "label_noise_one": Case(("--config.dataset.label_noise=1.0",),
                            "dataset.label_noise is 1.0; it must be a number in [0, 1)"),
    "eval_examples_beyond_split": Case(("--config.dataset.num_eval_examples=1000",),
                                       "dataset.num_eval_examples is 1000; it must be -1 or at "
                                       "most 360 (split 'test' of 'digits')"),
    "train_examples_beyond_split": Case(("--config.dataset.num_train_examples=5000",),
                                        "dataset.num_train_examples is 5000; it must be -1 or "
                                        "at most 1437"),
    "eval_examples_zero": Case(("--config.dataset.num_eval_examples=0",),
                               "dataset.num_eval_examples is 0"),
    # Numbers that are not finite, in any field.
    "lr_inf": Case(("--config.optimizer.lr=inf",), "optimizer.lr is inf; it must be finite"),
    "momentum_nan": Case(("--config.optimizer.momentum=nan",),
                         "optimizer.momentum is nan; it must be finite"),
    "decay_nan": Case(("--config.schedule.decay=nan",), "schedule.decay is nan"),
    "label_noise_nan": Case(("--config.dataset.label_noise=nan",),
                            "dataset.label_noise is nan"),
    "temperature_nan": Case(("--config.method.T=nan",), "method.T is nan; it must be finite"),
    "weight_inf": Case(("--config.method.kd_weight=inf",), "method.kd_weight is inf"),
    "baseline_field_minus_inf": Case(("--config.method_overrides.hsakd.teacher_lr=-inf",),
                                     "method_overrides.hsakd.teacher_lr is -inf; it must be "
                                     "finite"),
    # A method's preparation stage: its epochs, learning rate and milestones (named by its
    # TeacherPreparation / StudentPreparation).
    "preparation_epochs_zero": Case(("--config.method_overrides.sskd.teacher_epochs=0",),
                                    "method_overrides.sskd.teacher_epochs is 0; it must be an "
                                    "integer >= 1 (the epochs of stage teacher_sskd)"),
    "preparation_epochs_negative": Case(("--config.method_overrides.hsakd.teacher_epochs=-2",),
                                        "method_overrides.hsakd.teacher_epochs is -2"),
    "preparation_lr_nan": Case(("--config.method_overrides.hsakd.teacher_lr=nan",),
                               "method_overrides.hsakd.teacher_lr is nan; it must be finite"),
    "preparation_lr_zero": Case(("--config.method_overrides.hsakd.teacher_lr=0",),
                                "method_overrides.hsakd.teacher_lr is 0.0; it must be a number > "
                                "0, or -1 for optimizer.lr (the student's)"),
    "preparation_lr_negative": Case(("--config.method_overrides.hsakd.teacher_lr=-2.0",),
                                    "method_overrides.hsakd.teacher_lr is -2.0"),
    "preparation_milestones_beyond": Case(
        ("--config.method_overrides.sskd.teacher_milestones=(9,)",),
        "method_overrides.sskd.teacher_milestones is (9,); it must be a tuple of increasing "
        "epochs in (0, 5] (method_overrides.sskd.teacher_epochs is 5)"),
    "preparation_milestones_decreasing": Case(
        ("--config.method_overrides.hsakd.teacher_milestones=(4, 2)",),
        "method_overrides.hsakd.teacher_milestones is (4, 2)"),
    "student_preparation_epochs_zero": Case(
        ("--config", "configs/default.py:ab", "--config.dataset.name=digits",
         "--config.method.init_epochs=0"),
        "method.init_epochs is 0; it must be an integer >= 1 (the epochs of stage "
        "student_ab_init)", config=False),
    "student_preparation_lr_zero": Case(
        ("--config", "configs/default.py:fsp", "--config.dataset.name=digits",
         "--config.method.init_lr=0"), "method.init_lr is 0.0", config=False),
    # A method's own learning rate, momentum, weight decay and epochs, by their names.
    "method_lr_zero": Case(("--config", "configs/default.py:ega", "--config.dataset.name=digits",
                            "--config.method.teacher_head_lr=0"),
                           "method.teacher_head_lr is 0.0; it must be a number > 0",
                           config=False),
    "method_momentum_one": Case(("--config", "configs/default.py:ega",
                                 "--config.dataset.name=digits",
                                 "--config.method.teacher_head_momentum=1.0"),
                                "method.teacher_head_momentum is 1.0", config=False),
    "method_weight_decay_negative": Case(("--config", "configs/default.py:ega",
                                          "--config.dataset.name=digits",
                                          "--config.method.teacher_head_weight_decay=-1e-4"),
                                         "method.teacher_head_weight_decay is -0.0001",
                                         config=False),
    "method_epochs_negative": Case(("--config", "configs/default.py:reviewkd",
                                    "--config.dataset.name=digits",
                                    "--config.method.warmup_epochs=-1"),
                                   "method.warmup_epochs is -1", config=False),
    # Methods that are not distillation methods, and none.
    "method_name_empty": Case(("--config.method.name=",), "method.name is ''; it must name"),
    "self_supervised_method": Case(("--config.method.name=simclr",),
                                   "method.name names 'simclr', which is not a distillation "
                                   "method: it reads no teacher and its loss no labels"),
    "self_supervised_baseline": Case(("--config.baselines=ce,simclr",),
                                     "baselines names 'simclr', which is not a distillation"),
    # Paths for what they must be.
    "data_dir_is_a_file": Case(("--config.dataset.data_dir={raising}",),
                               "dataset.data_dir '{raising}' is a file, not a directory"),
    "data_dir_under_a_file": Case(("--config.dataset.data_dir={raising}/tfds",),
                                  "dataset.data_dir '{raising}/tfds' lies under '{raising}', a "
                                  "file, not a directory"),
    "data_dir_proc": Case(("--config.dataset.data_dir=/proc",),
                          "dataset.data_dir '/proc' is not writable"),
    "data_dir_unwritable": Case(("--config.dataset.data_dir=/sys/jaxkd_tfds",),
                                "dataset.data_dir '/sys/jaxkd_tfds' is not writable"),
    "teacher_checkpoint_missing": Case(("--config.teacher.checkpoint=/nonexistent/t.msgpack",),
                                       "teacher.checkpoint '/nonexistent/t.msgpack' does not "
                                       "exist"),
    "teacher_checkpoint_directory": Case(("--config.teacher.checkpoint={data_dir}",),
                                         "teacher.checkpoint '{data_dir}' is a directory, not a "
                                         "file"),
    # Special files are refused by their kind, never opened (a FIFO would block forever,
    # /dev/zero be read until the memory runs out), for a zoo teacher and a CLIP tower alike.
    "teacher_checkpoint_fifo": Case(("--config.teacher.checkpoint={fifo}",),
                                    "teacher.checkpoint '{fifo}' is a FIFO; give a regular "
                                    "file (a variables file, e.g. <workdir>/teacher/"),
    "teacher_checkpoint_device": Case(("--config.teacher.checkpoint=/dev/zero",),
                                      "teacher.checkpoint '/dev/zero' is a character device; "
                                      "give a regular file"),
    "clip_teacher_fifo": Case(("--config", "configs/demo.py:ega",
                               "--config.teacher.name=clip_vit_b32", "--config.teacher.pretrain=",
                               "--config.teacher.checkpoint={fifo}"),
                              "teacher.checkpoint '{fifo}' is a FIFO; give a regular file (a "
                              "Hugging Face CLIP folder or OpenAI's .pt file)", config=False),
    "tfds_builder_missing": Case(("--config.dataset.name=tfds:no_such_builder",),
                                 "tfds has no builder 'no_such_builder'"),
    # Values parsed where the config is checked.
    "mean_not_numbers": Case(("--config.dataset.mean=abc",), "dataset.mean is ('abc',); it "
                                                             "must be () for the dataset's own"),
    "mean_0_255": Case(("--config.dataset.mean=(33.0,)", "--config.dataset.std=(0.3,)"),
                       "dataset.mean is (33.0,)"),
    "std_zero": Case(("--config.dataset.mean=(0.3,)", "--config.dataset.std=(0.0,)"),
                     "dataset.std is (0.0,)"),
    "mean_without_std": Case(("--config.dataset.mean=(0.3,)",),
                             "dataset.std is (); it must be given too"),
    "mean_of_other_channels": Case(("--config.dataset.mean=(0.5, 0.5, 0.5)",
                                    "--config.dataset.std=(0.2, 0.2, 0.2)"),
                                   "must both have one value per channel of 'digits' (1)"),
    # Sizes beyond reason.
    "epochs_past_the_step_counter": Case(("--config.num_epochs=1000000000000",),
                                         "stage student_kd would run 22,000,000,000,000 steps "
                                         "(num_epochs 1,000,000,000,000 x 22 steps per epoch), "
                                         "more than the 2,147,483,647"),
    "teacher_epochs_2_31": Case(("--config.teacher.num_epochs=2147483648",),
                                "stage teacher would run 47,244,640,256 steps"),
    "preparation_epochs_huge": Case(("--config.method_overrides.sskd.teacher_epochs=1000000000",
                                     "--config.method_overrides.sskd.teacher_milestones=()"),
                                    "stage teacher_sskd would run 22,000,000,000 steps "
                                    "(method_overrides.sskd.teacher_epochs"),
    "run_beyond_a_year": Case(("--config.num_epochs=50000000",),
                              "more than 1,000,000,000: over a year even at 30 steps/s; set "
                              "fewer --config.num_epochs, or --config.allow_huge_run=True"),
    "input_workers_beyond_reason": Case(("--config.input_workers=100000",),
                                        "input_workers is 100000; it must be at most"),
    "batch_beyond_the_training_set": Case(("--config.batch_size=5000",),
                                          "batch_size is 5000; it must be an integer <= 1437"),
    # Data and teacher files, read by the plan (the split sizes given: nothing else reads them).
    "dataset_not_prepared": Case(("--config.dataset.name=cifar10",
                                  "--config.dataset.num_train_examples=8",
                                  "--config.dataset.num_eval_examples=8",
                                  "--config.dataset.data_dir={empty_dir}"),
                                 "dataset 'cifar10' (tfds 'cifar10') is not prepared"),
    "folder_missing": Case(("--config.dataset.name=folder:{empty_dir}/nope",),
                           "nope does not exist; expected the layout"),
    "teacher_file_missing": Case(("--config.teacher.checkpoint={empty_dir}/t.msgpack",),
                                 "t.msgpack' does not exist"),
    # A resnet8 file given as the demo's resnet20 teacher: the plan names what it fits.
    "teacher_file_misfit": Case(("--config.teacher.checkpoint={resnet8}",),
                                "does not fit the architecture: missing leaf 'batch_stats/"
                                "backbone/layer1_1/bn1/mean' (expected shape (16,)); it fits "
                                "resnet8 (set --config.teacher.name=resnet8)"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_dir):
  """Recipe files of a user: one that does not parse, one that fails when run, and one whose
  baseline has a bad temperature; a tfds data_dir with the digits built (as a first run does)."""
  root = tmp_path_factory.mktemp("recipes")
  (root / "broken.py").write_text("def get_config():\n  return (\n")
  (root / "raising.py").write_text("import ml_collections\n\nCONFIG = undefined_name\n")
  (root / "baseline_T.py").write_text(
      "from configs import demo\n\n\ndef get_config():\n  config = demo.get_config()\n"
      "  config.method_overrides.hsakd.T = -1.0\n  return config\n")
  paths = {name: str(root / f"{name}.py") for name in ("broken", "raising", "baseline_T")}
  shapes = networks.variable_shapes(networks.build_network("resnet8", 10), (8, 8, 1))
  resnet8 = str(root / "resnet8.msgpack")
  checkpoint.export_variables(resnet8, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  fifo = str(root / "teacher.fifo")
  os.mkfifo(fifo)
  return dict(paths, data_dir=str(digits_dir), empty_dir=str(tmp_path_factory.mktemp("empty")),
              resnet8=resnet8, fifo=fifo)


def command_line(case: Case, workdir: str, files: dict[str, str]) -> list[str]:
  args = [arg.format(**files) for arg in case.args]
  argv = ["jaxkd.main"] + (["--config", DEMO] if case.config else [])
  argv += ["--workdir", workdir] if case.workdir else []
  if (case.config or "--config" in args) and not any("data_dir" in arg for arg in args):
    args.append(f"--config.dataset.data_dir={files['data_dir']}")
  return argv + args


def refusal(capsys, argv: list[str]) -> str:
  """The one stderr line of `jaxkd.main.run(argv)`, which must exit with status 2."""
  status = main.run(argv)
  out, err = capsys.readouterr()
  assert (status, out) == (2, ""), err
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err.strip()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_before_any_work(name, files, tmp_path, capsys):
  case = CASES[name]
  workdir = str(tmp_path / "run")
  line = refusal(capsys, command_line(case, workdir, files))
  assert case.message.format(**files) in line
  assert not os.path.exists(workdir)


def _snapshot(root):
  """Every directory and file under `root`, with each file's modification time and bytes."""
  entries = set()
  for path, dirs, names in os.walk(root):
    entries.update((os.path.join(path, d), None, None) for d in dirs)
    for name in names:
      file = os.path.join(path, name)
      with open(file, "rb") as f:
        entries.add((file, os.stat(file).st_mtime_ns, f.read()))
  return entries


def test_an_existing_workdir_is_left_as_it_was(files, tmp_path, capsys):
  workdir = tmp_path / "run"
  (workdir / "teacher" / "checkpoints" / "20").mkdir(parents=True)
  (workdir / "teacher" / "result.json").write_text('{"top1_last": 0.5}')
  (workdir / "teacher" / "checkpoints" / "20" / "state").write_bytes(b"\0" * 64)
  before = _snapshot(workdir)
  for name in ("keep_checkpoints_zero", "milestones_beyond", "eval_examples_beyond_split",
               "misspelt_field", "unknown_model", "wrong_type", "dataset_not_prepared",
               "teacher_file_misfit"):
    refusal(capsys, command_line(CASES[name], str(workdir), files))
  assert _snapshot(workdir) == before


def test_print_config_lists_the_fields_after_overrides_and_writes_nothing(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  status = main.run(["jaxkd.main", "--config", f"{DEMO}:runlocal", "--workdir", workdir,
                     "--print_config", "--config.optimizer.lr=0.2"])
  out, err = capsys.readouterr()
  assert (status, err) == (0, "")
  lines = out.splitlines()
  assert "optimizer.lr = 0.2" in lines and "schedule.milestones = ()" in lines
  assert "dataset.name = 'digits'" in lines and "method_overrides.sskd.teacher_epochs = 1" in lines
  assert not os.path.exists(workdir)


def test_validate_checks_every_field_first():
  config = helpers.set_fields(demo.get_config("runlocal"), {"keep_checkpoints": 0})
  with pytest.raises(UserError, match="keep_checkpoints is 0; it must be an integer >= 1"):
    plan.make_plan(config, None, jax.sharding.Mesh(jax.devices()[:1], ("data",)))


def test_the_real_entry_point_answers_the_same(files, tmp_path, capsys):
  """`python -m jaxkd.main` (absl's app.run) prints the same line and exit status as run(),
  and nothing else: no line of the libraries (TensorFlow, tfds) before it."""
  names = ("misspelt_field", "unknown_config_argument", "eval_batch_size_zero", "wrong_type",
           "unknown_model", "dataset_not_prepared")
  procs = {}
  for name in names:
    argv = command_line(CASES[name], str(tmp_path / name), files)
    procs[name] = (argv, subprocess.Popen([sys.executable, "-m"] + argv, cwd=helpers.REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
  for name, (argv, proc) in procs.items():
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode, out, len(err.splitlines())) == (2, "", 1), err
    assert err.startswith("error: ") and err.strip() == refusal(capsys, argv)
    assert not os.path.exists(tmp_path / name)


def test_a_field_the_method_never_reads_is_named_in_one_warning(files, tmp_path, capsys):
  """KD reads no feat_weight: the plan names it as ignored, once, and goes on."""
  workdir = str(tmp_path / "run")
  argv = command_line(Case(("--plan", "--config.method.feat_weight=50.0"), ""), workdir, files)
  status = main.run(argv)
  out, err = capsys.readouterr()
  assert status == 0 and "student_kd" in out
  assert err.splitlines() == [
      "warning: method.feat_weight is not read by method 'kd' and ignored (its fields: T, "
      "ce_weight, kd_weight, logit_standardize)"]
  assert not os.path.exists(workdir)


def test_a_bucket_that_does_not_answer_is_one_line_in_bounded_time(files, tmp_path, capsys,
                                                                   monkeypatch):
  """A teacher.checkpoint on a bucket is probed for at most paths.PROBE_SECONDS: unreachable
  here (no network, or no credentials) it is one line either way, never a hang."""
  monkeypatch.setattr(paths, "PROBE_SECONDS", 3.0)
  workdir = str(tmp_path / "run")
  start = time.monotonic()
  line = refusal(capsys, command_line(Case((
      "--config.teacher.checkpoint=gs://jaxkd-no-such-bucket-25/teacher.msgpack",), ""),
      workdir, files))
  assert time.monotonic() - start < 60
  assert line.startswith("error: teacher.checkpoint 'gs://jaxkd-no-such-bucket-25/teacher."
                         "msgpack' ")
  assert "did not answer within 3 s" in line or "cannot be read" in line
  assert not os.path.exists(workdir)
  with pytest.raises(UserError, match="'gs://b/x' did not answer within 0.2 s"):
    paths.probe("dataset.data_dir", "gs://b/x", lambda _: time.sleep(5), seconds=0.2)


def test_a_huge_run_is_planned_when_asked_for(files, tmp_path, capsys):
  """Past 10^9 steps a stage needs allow_huge_run; past the int32 step counter, never."""
  workdir = str(tmp_path / "run")
  huge = ("--plan", "--config.num_epochs=50000000", "--config.allow_huge_run=True")
  assert main.run(command_line(Case(huge, ""), workdir, files)) == 0
  assert "1,100,000,000" in capsys.readouterr().out
  line = refusal(capsys, command_line(Case(huge + ("--config.num_epochs=100000000",), ""),
                                      workdir, files))
  assert "more than the 2,147,483,647 its int32 step counter" in line
def test_print_config_shows_the_values_that_apply(capsys):
  """Fields left None show what applies: the method's defaults, the dataset's flips."""
  status = main.run(["jaxkd.main", "--config", f"{DEMO}:runlocal", "--print_config",
                     "--config.method.kd_weight=0.5"])
  lines = capsys.readouterr().out.splitlines()
  assert status == 0
  assert "method.T = 4.0  # default" in lines and "method.ce_weight = 0.1  # default" in lines
  assert "method.kd_weight = 0.5" in lines
  assert "method.feat_weight = None  # not read by kd" in lines
  assert "method.logit_standardize = None  # default (off)" in lines
  assert "dataset.flip = False  # default" in lines  # The digits are not flipped.
  # A baseline's defaults that the recipe has no field for are listed, marked so.
  assert "method_overrides.sskd.ss_T = 0.5  # default; no field in this recipe" in lines
  assert "method_overrides.sskd.teacher_epochs = 1" in lines
  assert lines == sorted(lines, key=lambda line: line.partition(" = ")[0].split("."))
  main.run(["jaxkd.main", "--config", "configs/default.py:runlocal", "--print_config",
            "--config.method.logit_standardize=True", "--config.dataset.flip=False"])
  lines = capsys.readouterr().out.splitlines()
  # The switch brings its own defaults (KD with logit standardization: T 2, kd_weight 9).
  assert "method.T = 2.0  # default" in lines and "method.kd_weight = 9.0  # default" in lines
  assert "dataset.flip = False" in lines


@pytest.fixture
def refused_after_start(files, monkeypatch):
  """The demo's config, and an executor that writes what a stage writes before its first
  checkpoint (its config.json), then refuses (as a disk or a damaged file would)."""
  config = demo.get_config("runlocal")
  config.dataset.data_dir = files["data_dir"]

  def refuse(run_plan, mesh):
    os.makedirs(os.path.join(run_plan.workdir, "teacher"), exist_ok=True)
    with open(os.path.join(run_plan.workdir, "teacher", "config.json"), "w") as f:
      f.write("{}")
    raise UserError("refused after the workdir was created")

  monkeypatch.setattr(executor, "execute", refuse)
  return config


def test_a_refusal_removes_only_the_workdir_it_created(refused_after_start, tmp_path):
  config = refused_after_start
  created = tmp_path / "new"
  with pytest.raises(UserError, match="refused after"):
    train.train_and_evaluate(config, str(created))
  assert not created.exists()
  # A workdir that was there (empty, or holding another run's files) is left as it is.
  for existing, files_before in ((tmp_path / "empty", ()), (tmp_path / "other", ("notes.txt",))):
    existing.mkdir()
    for name in files_before:
      (existing / name).write_text("mine")
    with pytest.raises(UserError, match="refused after"):
      train.train_and_evaluate(config, str(existing))
    assert existing.is_dir() and (existing / "teacher" / "config.json").exists()
    assert all((existing / name).read_text() == "mine" for name in files_before)


def test_a_refusal_keeps_a_created_workdir_that_holds_work(refused_after_start, tmp_path,
                                                           monkeypatch):
  """A later stage's refusal in a workdir this run created: the finished stage stays."""
  def finish_then_refuse(run_plan, mesh):
    os.makedirs(os.path.join(run_plan.workdir, "teacher"))
    with open(os.path.join(run_plan.workdir, "teacher", "result.json"), "w") as f:
      f.write("{}")
    raise UserError("refused in stage student_kd")

  monkeypatch.setattr(executor, "execute", finish_then_refuse)
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match="student_kd"):
    train.train_and_evaluate(refused_after_start, str(workdir))
  assert (workdir / "teacher" / "result.json").exists()


# ------------------------------------------------------------------- special and huge files


def _returns_within(seconds, fn, *args):
  """What `fn(*args)` raises or returns, run in a thread given `seconds` (a FIFO opened by
  mistake would block it forever, and fail the test instead of hanging it)."""
  outcome = []

  def run():
    try:
      outcome.append(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append(e)
  worker = threading.Thread(target=run, daemon=True)
  worker.start()
  worker.join(seconds)
  assert outcome, f"{fn.__name__} did not return within {seconds} s"
  return outcome[0]


@pytest.mark.parametrize("reader", ["variables", "torch", "image", "clip_folder"])
def test_every_reader_of_a_given_file_refuses_a_fifo_by_its_kind(files, tmp_path, reader):
  """The teacher or evaluated file (jaxkd.evaluate, export_student), a PyTorch checkpoint
  (import_teacher, an OpenAI CLIP file), a folder dataset's image and a CLIP folder's files."""
  fifo = files["fifo"]
  clip_folder = tmp_path / "clip"
  clip_folder.mkdir()
  os.symlink(fifo, clip_folder / "config.json")
  calls = {"variables": (checkpoint.read_verified, fifo, "--checkpoint"),
           "torch": (torch_checkpoint.load, fifo),
           "image": (sources._stored_shape, fifo),  # pylint: disable=protected-access
           "clip_folder": (clip_weights.read_hf_folder, str(clip_folder))}
  error = _returns_within(20, *calls[reader])
  assert isinstance(error, UserError), error
  assert "is a FIFO; give a regular file" in str(error) and "\n" not in str(error)


def test_a_file_read_whole_is_bounded_by_the_memory(tmp_path, monkeypatch):
  """A file larger than the machine's memory is refused by its size before it is read; one
  whose size says nothing (a /proc file says 0) is read no further than the memory."""
  monkeypatch.setattr(paths, "memory_bytes", lambda: 1000)
  small, large = tmp_path / "small.msgpack", tmp_path / "large.msgpack"
  small.write_bytes(b"x" * 1000)
  large.write_bytes(b"x" * 1001)
  assert paths.read_whole(str(small), "teacher file", "") == b"x" * 1000
  for path in (str(large), "/proc/self/smaps"):  # smaps: st_size 0, several kB.
    with pytest.raises(UserError, match=f"teacher file '{path}' is larger than this "
                                        r"machine's memory \(0.0 GiB\), and it is read whole; "
                                        "give the right file$"):
      paths.read_whole(path, "teacher file", "give the right file")
  with pytest.raises(UserError, match="'/dev/zero' is a character device; give a regular file"):
    checkpoint.read_verified("/dev/zero", "variables file")
