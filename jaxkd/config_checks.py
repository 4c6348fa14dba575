"""Every config field checked before a run does any work, each refusal one line.

`load_config` reads a recipe as `--config file.py[:arg]` does, `check_override_paths` refuses an
override of a field the recipe does not have (naming the nearest field), and `check_config`
checks every value a run reads: every number finite, names against their registries, numbers
against their ranges, the schedule against the epochs, the hyper-parameters of every method the
run trains (by their names, and each preparation's schedule by the fields its record names),
the paths for what they must be (a bucket given a bounded time to answer), the statistics and
the example counts against the dataset's splits; it returns a warning line for each method
given fields it never reads. `check_steps` (called by the plan, which knows the steps per
epoch) bounds each stage's step count. Each refusal is a `UserError` naming the field, its
value, what is allowed and how to fix it; nothing here writes a file (the embedded digits are
built on first use where their splits are counted).
"""

import dataclasses
import difflib
import importlib.util
import math
import numbers
import os
import re
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import ml_collections

from jaxkd import defaults
from jaxkd import models
from jaxkd import optim
from jaxkd import paths
from jaxkd import recipe
from jaxkd.errors import UserError, unknown_name
from jaxkd.methods import Method, get_method
from jaxkd.models import clip

# jaxkd.data.sources brings TensorFlow (seconds to import): it is imported where values are
# checked, so that a mistake in the command line itself is answered at once.
# pylint: disable=g-import-not-at-top

_MISSING = object()


# ------------------------------------------------------------------------------ loading


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the recipe `spec` = 'file.py[:arg]', as `--config` loads it.

  A missing file, a file that does not run (syntax error, failed import) and an argument that
  `get_config` refuses with a ValueError become one-line UserErrors.
  """
  path, _, arg = spec.partition(":")
  if not path:
    raise UserError("--config is empty; pass a recipe file, e.g. --config configs/demo.py")
  paths.check_regular_file(path, "config file", "a recipe, e.g. --config configs/demo.py")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} does not exist; pass a recipe file, e.g. "
                    "--config configs/demo.py (run from the repository root)")
  module = _run_config_file(path)
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"config file {path!r} defines no get_config(); a recipe returns its "
                    "ConfigDict from get_config(arg)")
  try:
    config = module.get_config(arg) if ":" in spec else module.get_config()
  except ValueError as e:
    raise UserError(f"--config {spec}: {one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config() of {path!r} returned {type(config).__name__}, not a "
                    "ml_collections.ConfigDict")
  return config


def _run_config_file(path: str) -> Any:
  """The config file at `path` run as a module; an error in it becomes one line."""
  spec = importlib.util.spec_from_file_location("jaxkd_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {path!r} line {e.lineno}: {e.msg}; fix the file") from None
  except Exception as e:  # pylint: disable=broad-except  (the user's file: report, not crash)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f" line {frames[-1].lineno}" if frames else ""
    raise UserError(f"config file {path!r}{where} fails to run: {type(e).__name__}: "
                    f"{one_line(e)}; fix the file") from None
  return module


def one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


# ---------------------------------------------------------------------- field names


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """The dotted name of every field of `config`, sub-configs included ('optimizer',
  'optimizer.lr', ...), in sorted order."""
  for key, value in sorted(config.items()):
    name = f"{prefix}{key}"
    yield name
    if isinstance(value, ml_collections.ConfigDict):
      yield from field_names(value, f"{name}.")


def field_lines(config: ml_collections.ConfigDict) -> list[str]:
  """`name = value` for every leaf field of `config`, the form `--config.<name>=` sets."""
  lines = []
  for name in field_names(config):
    value = lookup(config, name)
    if isinstance(value, ml_collections.ConfigDict):
      if not value:
        lines.append(f"{name} = {{}}")
    else:
      lines.append(f"{name} = {value!r}")
  return lines


def _method_fields(config: ml_collections.ConfigDict
                   ) -> Iterator[tuple[str, Method, ml_collections.ConfigDict]]:
  """(field, method, effective hyper-parameters) of every method the run trains, and of the
  method that pretrains its teacher; names the registry does not know are left out."""
  for name in recipe.student_methods(config):
    try:
      method = get_method(name)
    except UserError:
      continue
    yield recipe.hparams_field(config, method), method, recipe.method_hparams(config, method)
  pretrain = config.get("teacher", {}).get("pretrain", "")
  if pretrain:
    try:
      method = get_method(pretrain)
    except UserError:
      return
    yield f"method_overrides.{pretrain}", method, recipe.pretrain_hparams(config, method)


def applied_field_lines(config: ml_collections.ConfigDict) -> list[str]:
  """`field_lines` with the values that apply: the hyper-parameters of each method the run
  trains as `recipe.method_hparams` resolves them. A field left None shows its method's default,
  marked `# default`; a default the recipe has no field for is listed too, marked `# default;
  no field in this recipe` (it cannot be set from the command line); a None field its method
  does not read is marked so, and a switch left off (`logit_standardize`) `# default (off)`.
  `dataset.flip` left None shows the dataset's choice (`defaults.default_flip`)."""
  lines = {tuple(line.partition(" = ")[0].split(".")): line for line in field_lines(config)}
  for field, method, hparams in _method_fields(config):
    for key, value in hparams.items():
      name = f"{field}.{key}"
      given = lookup(config, name, _MISSING)
      if given is _MISSING:
        lines[tuple(name.split("."))] = f"{name} = {value!r}  # default; no field in this recipe"
      elif given is None:
        lines[tuple(name.split("."))] = f"{name} = {value!r}  # default"
    section = lookup(config, field, None)
    for key, value in (section.items() if isinstance(section, ml_collections.ConfigDict)
                       else ()):
      if value is None and key not in hparams:
        note = ("default (off)" if key in method.switches() else f"not read by {method.name}")
        lines[(*field.split("."), key)] = f"{field}.{key} = None  # {note}"
  flip = lookup(config, "dataset.flip", _MISSING)
  if flip is None:
    lines[("dataset", "flip")] = (f"dataset.flip = {defaults.default_flip(config.dataset.name)!r}"
                                  "  # default")
  return [lines[name] for name in sorted(lines)]


def lookup(config: ml_collections.ConfigDict, name: str, default: Any = _MISSING) -> Any:
  """The value of dotted field `name`, or `default` where the config has no such field."""
  value = config
  for part in name.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return default
    value = value[part]
  return value


def check_override_paths(config: ml_collections.ConfigDict, paths: Sequence[str]) -> None:
  """Refuses `--config.<path>=` for a field `config` does not have, with the nearest name."""
  names = list(field_names(config))
  for path in paths:
    if lookup(config, path) is _MISSING:
      close = difflib.get_close_matches(path, names, n=1, cutoff=0.6)
      hint = (f"did you mean --config.{close[0]}?" if close
              else "--print_config lists the recipe's fields")
      raise UserError(f"--config.{path}: the config has no field {path!r}; {hint}")


def override_paths(argv: Sequence[str], name: str = "config") -> list[str]:
  """The dotted fields overridden in `argv` (`--config.a.b=v`, `--config.a.b v`,
  `--noconfig.flag`), as ml_collections' config flag finds them."""
  pattern = re.compile(rf"^-{{1,2}}(no)?{name}\.([^=]+)")
  return [m.group(2) for m in map(pattern.match, argv) if m]


# ---------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
  """Allowed numbers: [low, high], either end open or absent; `integer` for counts."""
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def __contains__(self, value: Any) -> bool:
    kind = numbers.Integral if self.integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
      return False
    above = self.low is None or (value > self.low if self.low_open else value >= self.low)
    below = self.high is None or (value < self.high if self.high_open else value <= self.high)
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a number"
    low, high = _number(self.low), _number(self.high)
    if self.low is not None and self.high is not None:
      return (f"{kind} in {'(' if self.low_open else '['}{low}, {high}"
              f"{')' if self.high_open else ']'}")
    if self.low is not None:
      return f"{kind} {'>' if self.low_open else '>='} {low}"
    return f"{kind} {'<' if self.high_open else '<='} {high}"


def _number(x: Optional[float]) -> str:
  return str(int(x)) if x is not None and float(x).is_integer() else f"{x}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)
FRACTION_OPEN_LOW = Range(0, 1, low_open=True)    # (0, 1]
FRACTION_OPEN_HIGH = Range(0, 1, high_open=True)  # [0, 1)

# (field, allowed values, a good value for the message) of the fields every run reads.
FIELD_RANGES = (
    ("seed", Range(0, 2**32 - 1, integer=True), "0"),
    ("num_epochs", COUNT, "240"),
    ("teacher.num_epochs", COUNT, "240"),
    ("batch_size", COUNT, "64"),
    ("eval_batch_size", COUNT, "128"),
    ("log_every_steps", COUNT, "100"),
    ("eval_every_epochs", COUNT, "1"),
    ("checkpoint_every_steps", COUNT, "1000"),
    ("keep_checkpoints", COUNT, "2"),
    ("input_workers", Range(0, integer=True), "0"),
    ("optimizer.lr", POSITIVE, "0.05"),
    ("optimizer.momentum", FRACTION_OPEN_HIGH, "0.9"),
    ("optimizer.weight_decay", NON_NEGATIVE, "5e-4"),
    ("schedule.decay", FRACTION_OPEN_LOW, "0.1"),
    ("dataset.train_fraction", FRACTION_OPEN_LOW, "1.0"),
    ("dataset.label_noise", FRACTION_OPEN_HIGH, "0.0"),
)


def out_of_range(field: str, value: Any, allowed: Any, fix: str) -> UserError:
  """The one-line refusal of `field` = `value`: what is allowed and how to fix it."""
  return UserError(f"{field} is {value!r}; it must be {allowed}: {fix}")


def check_range(config: ml_collections.ConfigDict, field: str, allowed: Range,
                example: str) -> None:
  value = lookup(config, field)
  if value is not _MISSING and value not in allowed:
    raise out_of_range(field, value, allowed, f"set e.g. --config.{field}={example}")


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """The fields of FIELD_RANGES, and `teacher.lr` (> 0, or −1 for `optimizer.lr`)."""
  for field, allowed, example in FIELD_RANGES:
    check_range(config, field, allowed, example)
  workers = lookup(config, "input_workers")
  most = max(64, 4 * (os.cpu_count() or 1))
  if workers is not _MISSING and workers > most:
    raise out_of_range("input_workers", workers, f"at most {most} (4 per CPU core of this "
                       f"host, {os.cpu_count()}): each worker is a process",
                       "set e.g. --config.input_workers=4")
  lr = lookup(config, "teacher.lr")
  if lr is not _MISSING and lr != -1 and lr not in POSITIVE:
    raise out_of_range("teacher.lr", lr, "a number > 0, or -1 for optimizer.lr",
                       "set e.g. --config.teacher.lr=0.05 (or -1)")
  opt = config.get("optimizer")
  if opt is not None and opt.get("nesterov", False) and not opt.get("momentum", 0) > 0:
    raise out_of_range("optimizer.nesterov", True, "False when optimizer.momentum is 0 "
                       "(Nesterov needs momentum)", "set --config.optimizer.momentum=0.9 or "
                       "--config.optimizer.nesterov=False")


def check_epochs(field: str, value: Any, num_epochs: int, num_epochs_field: str,
                 last_included: bool = False) -> None:
  """`value` of tuple field `field`: strictly increasing epochs in (0, num_epochs), or in
  (0, num_epochs] with `last_included` (a preparation's milestone at its last epoch changes
  nothing; recipes shrunk to one epoch keep theirs at 1)."""
  interval = f"(0, {num_epochs}{']' if last_included else ')'}"
  allowed = (f"a tuple of increasing epochs in {interval} ({num_epochs_field} is "
             f"{num_epochs})")
  fix = f"set e.g. --config.{field}='({max(num_epochs // 2, 1)},)', or '()' for none"
  inside = Range(0, num_epochs, low_open=True, high_open=not last_included)
  if not (isinstance(value, (tuple, list)) and all(m in inside for m in value)
          and all(a < b for a, b in zip(value, value[1:]))):
    raise out_of_range(field, value, allowed, fix)


def check_schedule(config: ml_collections.ConfigDict) -> None:
  """schedule.name, and its milestones and warm-up against num_epochs."""
  schedule = config.get("schedule")
  if schedule is None:
    return
  if schedule.name not in optim.SCHEDULES:
    raise unknown_name("schedule", schedule.name, optim.SCHEDULES)
  if schedule.name == "multistep":
    check_epochs("schedule.milestones", schedule.get("milestones", ()), config.num_epochs,
                 "num_epochs")
  warmup = schedule.get("warmup_epochs", 0)
  if warmup not in Range(0, config.num_epochs, high_open=True):
    raise out_of_range("schedule.warmup_epochs", warmup,
                       f"a number in [0, num_epochs) (num_epochs is {config.num_epochs})",
                       "set e.g. --config.schedule.warmup_epochs=0 (no warm-up)")


def check_linear_probe(config: ml_collections.ConfigDict) -> None:
  """The probe's dataset, epochs, learning rate and milestones, when there is a probe."""
  if not recipe.linear_probe_enabled(config):
    return
  probe = config.linear_probe
  check_dataset_name("linear_probe.dataset", probe.dataset)
  if probe.num_epochs not in COUNT:
    raise out_of_range("linear_probe.num_epochs", probe.num_epochs, COUNT,
                       "set e.g. --config.linear_probe.num_epochs=40 (or "
                       "--config.linear_probe.dataset='' to skip the probe)")
  check_range(config, "linear_probe.lr", POSITIVE, "0.1")
  check_epochs("linear_probe.milestones", probe.get("milestones", ()), probe.num_epochs,
               "linear_probe.num_epochs")


# ----------------------------------------------------------------------------- names


def check_names(config: ml_collections.ConfigDict,
                method_lookup: Callable[[str], Method] = get_method) -> None:
  """Models, methods (found by `method_lookup`) and the teacher's options against their
  registries."""
  teacher = config.teacher.name
  for name in (config.student.name,) + (() if teacher in clip.CLIP_MODELS else (teacher,)):
    models.get_model(name, 10)
  if not str(config.method.get("name", "")).strip():
    raise UserError(f"method.name is {config.method.get('name')!r}; it must name the method that "
                    "distils the student: set e.g. --config.method.name=kd (or ce, the student "
                    "alone)")
  for name in recipe.student_methods(config) + list(config.get("method_overrides", {}).keys()):
    method_lookup(name)
  keep = config.teacher.get("keep", "last")
  if keep not in ("last", "best"):
    raise UserError(f"teacher.keep is {keep!r}; it must be 'last' or 'best' (the teacher epoch "
                    "handed to the students): set --config.teacher.keep=last")
  pretrain = config.teacher.get("pretrain", "")
  if pretrain:
    method_lookup(pretrain)
  optimizer_name = config.get("optimizer", {}).get("name", "sgd")
  if optimizer_name != "sgd":
    raise unknown_name("optimizer", optimizer_name, ("sgd",))


# --------------------------------------------------------------------------- dataset


def check_dataset(config: ml_collections.ConfigDict) -> None:
  """The dataset's name and normalisation, and its first-N example counts: -1 or 1 .. the size
  of their split. (Sizes and statistics are read by jaxkd.plan, with data.get_dataset_info.)"""
  from jaxkd.data import sources
  dataset = config.dataset
  check_dataset_name("dataset", dataset.name)
  normalization = dataset.get("normalization", "dataset") or "dataset"
  if normalization not in sources.NORMALIZATIONS:
    raise unknown_name("dataset.normalization", normalization, sources.NORMALIZATIONS)
  for field in ("num_train_examples", "num_eval_examples"):
    count = dataset.get(field, -1)
    if count != -1 and count not in COUNT:
      raise out_of_range(f"dataset.{field}", count, "-1 (the whole split) or an integer >= 1",
                         f"set e.g. --config.dataset.{field}=-1")
  check_statistics(dataset)
  check_split_sizes(dataset)


# Per-channel statistics of pixels in [0, 1]: (field, allowed value of each channel).
STATISTICS = (("mean", Range(0, 1)), ("std", Range(0, 1, low_open=True)))


def check_statistics(dataset: ml_collections.ConfigDict) -> None:
  """dataset.mean and dataset.std: () or one number per channel, of pixels in [0, 1] (a mean in
  [0, 1], a std in (0, 1]), both given or neither (their count against the dataset's channels
  is checked with its info)."""
  given = {}
  for field, allowed in STATISTICS:
    value = dataset.get(field, ()) or ()
    if not isinstance(value, (tuple, list)) or not all(v in allowed for v in value):
      raise out_of_range(f"dataset.{field}", value, f"() for the dataset's own, or a tuple of "
                         f"one number per channel, each {allowed} (pixels in [0, 1]: divide "
                         "0-255 statistics by 255)",
                         f"set e.g. --config.dataset.{field}='(0.5, 0.5, 0.5)', or '()'")
    given[field] = tuple(value)
  if bool(given["mean"]) != bool(given["std"]):
    missing = "std" if given["mean"] else "mean"
    raise out_of_range(f"dataset.{missing}", (), "given too when dataset."
                       f"{'mean' if missing == 'std' else 'std'} is",
                       f"set --config.dataset.{missing} (one value per channel), or both '()'")


# --------------------------------------------------------------------------------- paths


def check_paths(config: ml_collections.ConfigDict) -> None:
  """The paths a run reads, each for what it must be: `dataset.data_dir` a directory (or
  where one can be made), `teacher.checkpoint` an existing file (a CLIP tower's weights are
  checked with the teacher). A bucket (gs://) must answer within paths.PROBE_SECONDS."""
  data_dir = config.dataset.get("data_dir", "")
  if data_dir:
    check_directory("dataset.data_dir", data_dir)
  checkpoint = config.teacher.get("checkpoint", "")
  if checkpoint and config.teacher.name not in clip.CLIP_MODELS:
    check_file("teacher.checkpoint", checkpoint)


def check_directory(field: str, directory: str) -> None:
  """`directory` is a directory, or can be made where it would be (no file on its way)."""
  if paths.is_url(directory):
    paths.probe(field, directory, lambda p: p.exists())
    return
  target = os.path.abspath(os.path.expanduser(directory))
  path = target
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "is a file" if path == target else f"lies under {path!r}, a file"
    raise UserError(f"{field} {directory!r} {where}, not a directory; pass a directory (e.g. "
                    f"--config.{field}=~/tensorflow_datasets)")


def check_file(field: str, file: str) -> None:
  """`file` exists and is a regular file (on a bucket: answers, within paths.PROBE_SECONDS)."""
  if paths.is_url(file):
    found = paths.probe(field, file, lambda p: p.is_file())
    is_dir = False
  else:
    local = os.path.expanduser(file)
    found, is_dir = os.path.isfile(local), os.path.isdir(local)
    if not is_dir:  # A FIFO or a device: refused by its kind, never opened.
      paths.check_regular_file(file, field, "a variables file, e.g. <workdir>/teacher/"
                               "teacher.msgpack of an earlier run")
  if not found:
    what = "is a directory, not a file" if is_dir else "does not exist"
    raise UserError(f"{field} {file!r} {what}; pass an existing variables file (e.g. "
                    "<workdir>/teacher/teacher.msgpack of an earlier run), or "
                    f"--config.{field}='' to train the teacher here")


def check_dataset_name(kind: str, name: str) -> None:
  """A registry name, or a `tfds:`/`folder:` source (jaxkd.data.sources)."""
  from jaxkd.data import sources
  if sources.own_source(name) is None and name not in sources.DATASET_NAMES:
    raise UserError(f"{unknown_name(kind, name, sources.DATASET_NAMES)}; or your own data: "
                    f"{sources.TFDS_PREFIX}<tfds builder> or {sources.FOLDER_PREFIX}<dir>")


def check_split_sizes(dataset: ml_collections.ConfigDict) -> None:
  """num_train_examples / num_eval_examples no larger than their splits, where the dataset is
  prepared (an unprepared one is reported when it is read)."""
  from jaxkd.data import sources
  wanted = [(f, dataset.get(f"{f}_split", d), dataset.get(f"num_{f}_examples", -1))
            for f, d in (("train", "train"), ("eval", "test"))]
  if all(count <= 0 for _, _, count in wanted):
    return  # get_dataset_info took both sizes from the splits themselves.
  builder = sources.get_builder(dataset)  # The digits are built here, on first use.
  if not builder.is_prepared():
    return
  splits = builder.info.splits
  for role, split, count in wanted:
    try:
      available = splits[split].num_examples
    except (KeyError, ValueError):
      raise UserError(f"dataset {dataset.name!r} has no split {split!r}; its splits: "
                      f"{', '.join(sorted(splits))}") from None
    if count > available:
      raise out_of_range(f"dataset.num_{role}_examples", count,
                         f"-1 or at most {available} (split {split!r} of {dataset.name!r})",
                         f"set e.g. --config.dataset.num_{role}_examples={available}")


# --------------------------------------------------------------------------- methods


def is_temperature(key: str) -> bool:
  """Hyper-parameters that divide logits or similarities: T, *_T, temperature, *_temperature."""
  return key == "T" or key.endswith("_T") or key == "temperature" or key.endswith("_temperature")


# (is the hyper-parameter one of these, allowed values, what it is) by its name, for every
# method: its own hyper-parameters follow the names of the config's fields.
NAMED_HPARAMS = (
    (lambda key: key.endswith("_weight"), NON_NEGATIVE, "a loss weight; 0 = off"),
    (lambda key: key == "lr" or key.endswith("_lr"), POSITIVE, "a learning rate"),
    (lambda key: key.endswith("_momentum"), FRACTION_OPEN_HIGH, "a momentum"),
    (lambda key: key.endswith("_weight_decay"), NON_NEGATIVE, "a weight decay"),
    (lambda key: key.endswith("_epochs"), NON_NEGATIVE, "a number of epochs"),
)


def preparations(method: Method) -> list[Any]:
  """The method's preparation stages (TeacherPreparation, StudentPreparation)."""
  return [prep for prep in (method.teacher, method.student_preparation) if prep is not None]


def check_hparams(field: str, method: Method, hparams: ml_collections.ConfigDict) -> None:
  """The generic hyper-parameters: temperatures > 0, loss weights (*_weight) >= 0, learning
  rates > 0, momenta in [0, 1), weight decays and epochs >= 0, tuples of numbers where the
  method's default is one; each preparation's schedule (check_preparation); then the method's
  own check_hparams."""
  scheduled = {name for prep in preparations(method) for name in (prep.num_epochs, prep.lr)}
  for key, value in hparams.items():
    example = method.defaults.get(key)
    if is_temperature(key) and value not in POSITIVE:
      raise out_of_range(f"{field}.{key}", value, POSITIVE,
                         f"set e.g. --config.{field}.{key}={example or 4.0}")
    for named, allowed, what in NAMED_HPARAMS:
      if key not in scheduled and named(key) and value not in allowed:
        raise out_of_range(f"{field}.{key}", value, f"{allowed} ({what})",
                           f"set e.g. --config.{field}.{key}={example}")
    if isinstance(example, tuple) and example and isinstance(example[0], numbers.Real) and (
        not isinstance(value, (tuple, list)) or not all(v in Range() for v in value)):
      raise out_of_range(f"{field}.{key}", value, "a tuple of numbers",
                         f"set e.g. --config.{field}.{key}='{example}'")
  for prep in preparations(method):
    check_preparation(field, method, prep, hparams)
  if method.check_hparams is not None:
    method.check_hparams(hparams)


def check_preparation(field: str, method: Method, prep: Any,
                      hparams: ml_collections.ConfigDict) -> None:
  """A preparation stage's schedule, from the hparams fields its record names: epochs >= 1, a
  learning rate > 0 or -1 (the student's optimizer.lr), milestones inside its own epochs."""
  epochs_field = f"{field}.{prep.num_epochs}"
  epochs = hparams.get(prep.num_epochs)
  if epochs not in COUNT:
    example = method.defaults.get(prep.num_epochs, 1)
    raise out_of_range(epochs_field, epochs, f"{COUNT} (the epochs of stage "
                       f"{_preparation_stage(method, prep)})",
                       f"set e.g. --config.{epochs_field}={example}")
  lr = hparams.get(prep.lr)
  if isinstance(lr, bool) or (lr != -1 and lr not in POSITIVE):
    raise out_of_range(f"{field}.{prep.lr}", lr, "a number > 0, or -1 for optimizer.lr (the "
                       "student's)", f"set e.g. --config.{field}.{prep.lr}=0.05 (or -1)")
  milestones = getattr(prep, "milestones", None)
  if milestones:
    check_epochs(f"{field}.{milestones}", hparams.get(milestones, ()), epochs, epochs_field,
                 last_included=True)


def _preparation_stage(method: Method, prep: Any) -> str:
  return (f"teacher_{method.name}" if prep is method.teacher
          else f"student_{method.name}_init")


def method_fields(config: ml_collections.ConfigDict, method: Method) -> frozenset[str]:
  """The hyper-parameters `method` reads: its defaults (those of the run's pair too), the fields
  its switches set and their own fields, and its optional ones (Method.optional_hparams)."""
  pair = (config.teacher.name, config.student.name)
  return frozenset(method.hparams(None, pair=pair)) | method.switched_fields() | frozenset(
      method.switches()) | frozenset(method.optional_hparams)


def unread_fields_warning(config: ml_collections.ConfigDict, method: Method, field: str,
                          given: Optional[ml_collections.ConfigDict]) -> Optional[str]:
  """One line naming the fields set in `given` (the config's `field`) that `method` never
  reads, or None when it reads them all."""
  known = method_fields(config, method)
  unread = [key for key, value in (given or {}).items()
            if key != "name" and value is not None and key not in known]
  if not unread:
    return None
  return (f"warning: {', '.join(f'{field}.{key}' for key in unread)} "
          f"{'is' if len(unread) == 1 else 'are'} not read by method {method.name!r} and "
          f"ignored (its fields: {', '.join(sorted(known)) or 'none'})")


def check_methods(config: ml_collections.ConfigDict,
                  method_lookup: Callable[[str], Method] = get_method) -> list[str]:
  """The hyper-parameters of every method the run trains (method_hparams: the effective ones),
  and of the self-supervised method that pretrains the teacher; returns a warning line for each
  of them that is given fields it never reads."""
  warnings = []
  overrides = config.get("method_overrides", ml_collections.ConfigDict())
  for name in recipe.student_methods(config):
    method = method_lookup(name)
    field = recipe.hparams_field(config, method)
    check_hparams(field, method, recipe.method_hparams(config, method))
    given = config.method if field == "method" else overrides.get(field.partition(".")[2])
    warnings.append(unread_fields_warning(config, method, field, given))
  pretrain = config.teacher.get("pretrain", "")
  if pretrain:
    method = method_lookup(pretrain)
    field = f"method_overrides.{pretrain}"
    check_hparams(field, method, recipe.pretrain_hparams(config, method))
    warnings.append(unread_fields_warning(config, method, field, overrides.get(pretrain)))
  return [w for w in warnings if w is not None]


# ---------------------------------------------------------------------------- numbers


def _not_finite(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return any(_not_finite(v) for v in value)
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and not math.isfinite(value))


def check_finite(config: ml_collections.ConfigDict) -> None:
  """Every number of every field finite, inside tuples too (nan and inf are refused wherever
  they are given: a learning rate, a weight, a milestone, a method's own field)."""
  for name in field_names(config):
    value = lookup(config, name)
    if _not_finite(value):
      raise out_of_range(name, value, "finite (nan and inf are not numbers a run can use)",
                         f"set --config.{name} to a finite value")


# Training steps of one stage: the step counter is an int32; past HUGE_STEPS a run needs
# `allow_huge_run` (it would take more than a year at a fast 30 steps/s).
MAX_STEPS = 2**31 - 1
HUGE_STEPS = 10**9


def check_steps(config: ml_collections.ConfigDict, stage_name: str, epochs_field: str,
                num_epochs: int, steps_per_epoch: int, num_train: int) -> None:
  """A stage's step count: at least one step per epoch, no more steps than the int32 step
  counter holds, and more than HUGE_STEPS only with `allow_huge_run`."""
  batch = config.batch_size
  if steps_per_epoch < 1:
    raise out_of_range("batch_size", batch, f"an integer <= {num_train} (the training examples "
                       f"of dataset {config.dataset.name!r}: one step per epoch at least)",
                       f"set e.g. --config.batch_size={min(64, num_train)}")
  steps = num_epochs * steps_per_epoch
  what = (f"stage {stage_name} would run {steps:,} steps ({epochs_field} {num_epochs:,} x "
          f"{steps_per_epoch:,} steps per epoch)")
  if steps > MAX_STEPS:
    raise UserError(f"{what}, more than the {MAX_STEPS:,} its int32 step counter and learning-"
                    f"rate schedule hold: set fewer --config.{epochs_field}")
  if steps > HUGE_STEPS and not config.get("allow_huge_run", False):
    raise UserError(f"{what}, more than {HUGE_STEPS:,}: over a year even at 30 steps/s; set "
                    f"fewer --config.{epochs_field}, or --config.allow_huge_run=True if you "
                    "mean it")


# ---------------------------------------------------------------------------- entry


def check_config(config: ml_collections.ConfigDict,
                 method_lookup: Callable[[str], Method] = get_method) -> list[str]:
  """Every check of a field's value that needs no device and writes nothing (see the module
  docstring); raises a one-line UserError on the first bad field, else returns the warning
  lines (fields no method reads) for the caller to print once every check passed.
  `method_lookup` finds a method by name (the registry's get_method; a caller may add methods
  of its own)."""
  check_finite(config)
  check_names(config, method_lookup)
  check_ranges(config)
  check_schedule(config)
  check_linear_probe(config)
  warnings = check_methods(config, method_lookup)
  check_paths(config)
  check_dataset(config)
  return warnings
