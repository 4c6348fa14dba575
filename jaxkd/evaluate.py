"""Held-out top-1 / top-5 of a network file: check an imported teacher before distilling from it.

    python -m jaxkd.import_teacher --arch resnet32x4 --num_classes 100 \\
        --out teachers/resnet32x4.msgpack ckpt_epoch_240.pth
    python -m jaxkd.evaluate --model resnet32x4 --checkpoint teachers/resnet32x4.msgpack \\
        --config.dataset.name=cifar100 --config.dataset.data_dir=DIR

prints the top-1 and top-5 (percent) of the network on the dataset's eval split, every example
counted once, as the trainer's evaluations count them (`jaxkd.evaluation.evaluate`). The file is
any jaxkd variables file of a zoo (or registered) network: an imported or trained teacher
(`<workdir>/teacher/teacher.msgpack`), or a student exported by a method without heads (KD, CE).

A file inside a stage of a workdir (`runs/demo/student_kd/student.msgpack`) needs no more: the
model and the dataset are read from the stage's saved `config.json` (what the stage was trained
with), unless `--model` or `--config.dataset.<field>=` say otherwise:

    python -m jaxkd.evaluate --checkpoint runs/demo/student_kd/student.msgpack

A method that deploys another network than the trained student (`Method.deployed`: SimKD's
student backbone, projector and the teacher's classifier) exports that network, and the file is
read as it, as the student stage evaluated it: for a stage's file the method, its teacher's
network and its hyper-parameters come from the stage's `config.json`; elsewhere `--method` names
the method and `--teacher` the teacher's network (the hyper-parameters: the method's defaults):

    python -m jaxkd.evaluate --checkpoint runs/x/student_simkd/student.msgpack
    python -m jaxkd.evaluate --model resnet8x4 --method simkd --teacher resnet32x4 \
        --checkpoint simkd_r8x4.msgpack --config.dataset.name=cifar100

The config is built in (no recipe file is needed, so it works from an installed package): the
dataset fields every recipe has (`jaxkd.defaults.dataset_config`), `eval_batch_size` and
`half_precision`, each settable with `--config.<field>=` as in `jaxkd.main`. Bad input ends with
one line `error: …` and exit status 2.
"""

import functools
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from jaxkd import cli
from jaxkd import config_checks
from jaxkd import defaults
from jaxkd import paths
from jaxkd.errors import UserError

# A stage's saved config, beside the files it exports (jaxkd.stage_config.CONFIG_FILE).
STAGE_CONFIG = "config.json"


def default_config() -> ml_collections.ConfigDict:
  """The command's config: the recipes' dataset defaults, the eval batch and the precision."""
  return ml_collections.ConfigDict(dict(
      dataset=defaults.dataset_config(),
      eval_batch_size=128,     # global, over all devices; the last batch is padded
      half_precision=False,    # compute in bfloat16, as a run with half_precision does
  ))


_MODEL = flags.DEFINE_string("model", None, "Zoo (or registered) network name, e.g. resnet32x4; "
                              "default: the model of the workdir stage holding --checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "jaxkd variables file (.msgpack) of it.")
_METHOD = flags.DEFINE_string("method", "", "The method that exported the file, when it deploys "
                              "another network than the student alone (e.g. simkd); default: "
                              "the method of the workdir stage holding --checkpoint.")
_TEACHER = flags.DEFINE_string("teacher", "", "With --method: the teacher's network name; "
                               "default: the teacher of that stage.")
flags.mark_flags_as_required(["checkpoint"])


def with_progress(fn: Callable, total: int, stream: Any = sys.stderr,
                  interval_s: float = 10.0) -> Callable:
  """`fn` (the eval step, called once per batch) that also prints a progress line (batches
  done, elapsed time, an estimate of what is left) once `interval_s` seconds have passed since
  the last one: a long evaluation shows it is moving, a short one prints nothing."""
  done, start = 0, time.perf_counter()
  last = start

  def wrapped(*args):
    nonlocal done, last
    out = fn(*args)
    done += 1
    now = time.perf_counter()
    if now - last >= interval_s:
      last = now
      left = (now - start) / done * (total - done)
      print(f"[eval] batch {done}/{total}, {now - start:.0f}s, about {left:.0f}s left",
            file=stream, flush=True)
    return out

  return wrapped


def saved_hparams(method: Any, teacher: str, student: str, path: str
                  ) -> ml_collections.ConfigDict:
  """`method`'s hyper-parameters for the pair, updated with those of the workdir stage holding
  file `path` when that stage trained with that method (its saved config.json)."""
  hparams = method.hparams(pair=(teacher, student))
  saved = saved_stage_config(path)
  effective = saved["effective"] if saved is not None else {}
  if effective.get("method") == method.name:
    for key, value in effective.items():
      if key.startswith("method."):
        hparams[key.partition(".")[2]] = tuple(value) if isinstance(value, list) else value
  return hparams


def deployment(method: str, teacher: str, path: str) -> tuple[str, str]:
  """(method, teacher network) whose deployed network file `path` holds ('' where it holds a
  network alone): as the command line gives them; where `path` lies in a workdir stage, that
  stage's method when it deploys another network (Method.deployed) and its teacher, unless
  given."""
  saved = saved_stage_config(path)
  if saved is None:
    return method, teacher
  if not method:
    from jaxkd.methods import get_method  # pylint: disable=g-import-not-at-top
    try:
      found = get_method(saved["effective"].get("method", ""))
    except UserError:  # Not a registered method (a linear probe's stage).
      return "", teacher
    method = found.name if found.deployed is not None else ""
  if method and not teacher:
    teacher = saved["run"].get("teacher", {}).get("name", "")
  return method, teacher


def deployed_network(model_name: str, method_name: str, teacher: str, path: str, info: Any,
                     dtype: Any) -> Any:
  """The network method `method_name` deploys (Method.deployed) on student network
  `model_name`, with the frozen teacher `teacher`'s output shapes as its student stage saw
  them and its hyper-parameters (`saved_hparams`) for file `path`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxkd import models  # pylint: disable=g-import-not-at-top
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  from jaxkd.methods import get_method  # pylint: disable=g-import-not-at-top
  method = get_method(method_name)
  if method.deployed is None:
    raise UserError(f"method {method.name!r} exports the student network itself; leave "
                    f"--method out")
  if not teacher:
    raise UserError(f"method {method.name!r} deploys the student with parts of its teacher; "
                    f"name the teacher's network with --teacher")
  teacher_net = networks.build_network(teacher, info.num_classes, dtype=dtype).clone(
      preact=method.teacher_taps_preact, class_maps=method.class_maps)
  image = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  teacher_out = jax.eval_shape(lambda: teacher_net.init_with_output(
      jax.random.key(0), image, train=False)[0])
  hparams = saved_hparams(method, teacher, model_name, path)
  student = models.get_model(model_name, info.num_classes, dtype=dtype)
  return method.deployed.module(student, teacher_out, info.num_classes, hparams)


def load_network(model_name: str, path: str, info: Any, dtype: Any = None, method: str = "",
                 teacher: str = "") -> tuple[Any, Any]:
  """(network, variables): zoo (or registered) network `model_name` for dataset `info` (a
  `jaxkd.data.DatasetInfo`) computing in `dtype` (None: float32), and its variables read from
  file `path`, checked to fit it (a UserError names the first leaf that does not). With
  `method`, the network that method deploys on `model_name` beside teacher network `teacher`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  dtype = dtype or jnp.float32
  if method:
    network = deployed_network(model_name, method, teacher, path, info, dtype)
    what = f"{model_name} checkpoint deployed by {method}"
  else:
    network = networks.build_network(model_name, info.num_classes, dtype=dtype)
    what = f"{model_name} checkpoint"
  return network, networks.read_variables(network, path, info.image_shape, what=what)


def evaluate_file(model_name: str, path: str, config: ml_collections.ConfigDict,
                  mesh: Any = None, progress: Optional[Any] = None, method: str = "",
                  teacher: str = "") -> dict[str, float]:
  """{'top1', 'top5'} (percent) and 'count' (eval images) of network `model_name` with the
  variables of file `path`, on `config.dataset`'s eval split.

  Raises a UserError for an unknown model or dataset, a dataset that is not prepared, a batch
  that does not divide over the devices, or a file that is missing or does not fit the model.
  `progress`: a stream for a progress line every 10 s (None: silent). `method`, `teacher`: the
  file holds the network that method deploys beside that teacher network (see load_network).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxkd import data  # pylint: disable=g-import-not-at-top
  from jaxkd import evaluation  # pylint: disable=g-import-not-at-top
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  from jaxkd import parallel  # pylint: disable=g-import-not-at-top
  from jaxkd import steps  # pylint: disable=g-import-not-at-top

  mesh = parallel.create_mesh() if mesh is None else mesh
  info = data.get_dataset_info(config.dataset)
  parallel.check_batch_divides(config.eval_batch_size, mesh, "eval_batch_size")
  network, variables = load_network(model_name, path, info, networks.compute_dtype(config),
                                    method, teacher)
  variables = parallel.replicate(variables, mesh)
  eval_fn = jax.jit(functools.partial(steps.eval_step, network=network))
  if progress is not None:
    eval_fn = with_progress(eval_fn, data.num_eval_steps(info, config.eval_batch_size), progress)
  scores = evaluation.evaluate(network, variables, config, mesh, eval_fn)
  return dict(scores, count=info.num_eval)


def saved_stage_config(path: str) -> Optional[dict[str, Any]]:
  """The `config.json` of the workdir stage whose directory holds file `path`, or None."""
  saved = os.path.join(os.path.dirname(paths.absolute(path)), STAGE_CONFIG)
  if not paths.exists(saved):
    return None
  record, why = paths.read_json(saved, "stage config")  # A FIFO or a device: never opened.
  if why is not None:
    return None
  ok = isinstance(record, dict) and "model" in record.get("effective", {}) and isinstance(
      record.get("run", {}).get("dataset"), dict)
  return record if ok else None


def model_and_config(model: Optional[str], path: str, config: ml_collections.ConfigDict,
                     given: Sequence[str]) -> tuple[str, ml_collections.ConfigDict]:
  """The network name and config to evaluate file `path` with: `model` and `config` as the
  command line gives them; where `path` lies in a workdir stage, the stage's model (when no
  `model` is given) and its dataset fields (those not among the `given` overrides)."""
  saved = saved_stage_config(path)
  if saved is None:
    if not model:
      raise UserError(f"--model is required: {path!r} lies in no workdir stage (no "
                      f"{STAGE_CONFIG} beside it) to read the network from; e.g. --model=resnet8")
    return model, config
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in saved["run"]["dataset"].items():
    if key in config.dataset and f"dataset.{key}" not in given:
      config.dataset[key] = tuple(value) if isinstance(value, list) else value
  return model or saved["effective"]["model"], config


def main(argv):
  del argv  # No positional arguments (parse_flags).
  # Library INFO logs would drown the result; -v 0 brings them back.
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:
    logging.set_verbosity(logging.WARNING)
  cli.quiet_libraries(verbose)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")  # as jaxkd.main evaluates
  try:
    paths.check_regular_file(_CHECKPOINT.value, "--checkpoint", "a variables file, e.g. "
                             "<workdir>/student_kd/student.msgpack")
    model, config = model_and_config(_MODEL.value, _CHECKPOINT.value, flags.FLAGS.config,
                                     config_checks.override_paths(sys.argv))
    method, teacher = deployment(_METHOD.value, _TEACHER.value, _CHECKPOINT.value)
    scores = evaluate_file(model, _CHECKPOINT.value, config, progress=sys.stderr,
                           method=method, teacher=teacher)
  except UserError as e:
    sys.exit(cli.report(e))
  dataset = config.dataset
  print(f"{model} {_CHECKPOINT.value} on {dataset.name} {dataset.eval_split} "
        f"({scores['count']:,} images): top-1 {scores['top1']:.2f}  top-5 {scores['top5']:.2f}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a mistake in a flag (a wrong type, a field the config does not have, a
  missing --checkpoint) reported in one line and exit status 2, as `jaxkd.main` reports it."""
  def parse(argv: list[str]) -> list[str]:
    config_checks.check_override_paths(default_config(), config_checks.override_paths(argv))
    # Defined here, after that check: the flag reads its overrides as it is defined.
    config_flags.DEFINE_config_dict("config", default_config(), "Dataset and evaluation "
                                    "settings.", lock_config=True, sys_argv=list(argv))
    return flags.FLAGS(argv)

  return cli.parse_flags(parse, argv)


if __name__ == "__main__":
  cli.quiet_environment(sys.argv)
  app.run(main, flags_parser=parse_flags)
