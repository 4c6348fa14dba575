"""What a run's config asks for, read in one place: the student methods in order, each method's
effective hyper-parameters, the teacher's and the preparation stages' learning rates, and the
linear probe.

Nothing here checks or trains: `jaxkd.config_checks` checks these values and `jaxkd.plan` turns
them into stages.
"""

import ml_collections

from jaxkd.methods import Method, canonical_name


def student_methods(config: ml_collections.ConfigDict) -> list[str]:
  """config.method.name first, then the comma-separated `config.baselines`, without repeats,
  each under its canonical name (jaxkd.methods.canonical_name)."""
  names = [config.method.name] + [n.strip() for n in config.get("baselines", "").split(",")]
  return list(dict.fromkeys(canonical_name(n) for n in names if n))


def is_main_method(config: ml_collections.ConfigDict, method: Method) -> bool:
  """Whether `method` is `config.method` (the others are `config.baselines`)."""
  return method.name == canonical_name(config.method.name)


def hparams_field(config: ml_collections.ConfigDict, method: Method) -> str:
  """Where `method`'s hyper-parameters are set: 'method' or 'method_overrides.<key>' (a
  RepDistiller alias as the key works too)."""
  if is_main_method(config, method):
    return "method"
  for key in config.get("method_overrides", {}).keys():
    if canonical_name(key) == method.name:
      return f"method_overrides.{key}"
  return f"method_overrides.{method.name}"


def method_hparams(config: ml_collections.ConfigDict, method: Method
                   ) -> ml_collections.ConfigDict:
  """A student method's hyper-parameters: its defaults (those of the teacher/student pair
  where they differ), then `config.method` for the main method or
  `config.method_overrides.<name>` for a baseline."""
  field = hparams_field(config, method)
  overrides = config.method if field == "method" else (
      config.get("method_overrides", {}).get(field.partition(".")[2]))
  return method.hparams(overrides, pair=(config.teacher.name, config.student.name))


def pretrain_hparams(config: ml_collections.ConfigDict, method: Method
                     ) -> ml_collections.ConfigDict:
  """The hyper-parameters of the self-supervised method that pretrains the teacher
  (`config.teacher.pretrain`): its defaults, then `config.method_overrides.<name>`."""
  return method.hparams(config.get("method_overrides", {}).get(config.teacher.pretrain))


def teacher_lr(config: ml_collections.ConfigDict) -> float:
  """`teacher.lr`, or `optimizer.lr` where it is −1."""
  lr = config.teacher.get("lr", -1.0)
  return lr if lr > 0 else config.optimizer.lr


def preparation_lr(config: ml_collections.ConfigDict, lr: float) -> float:
  """A preparation stage's learning rate: `lr`, or the student's `optimizer.lr` where it is −1."""
  return float(lr) if lr > 0 else config.optimizer.lr


def linear_probe_enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("linear_probe") and config.linear_probe.get("dataset", ""))


def linear_probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config with the probe's dataset (the run's own, as it is, or another one with
  the same data_dir and normalisation) and the probe's epochs."""
  probe = ml_collections.ConfigDict(config.to_dict())
  name = config.linear_probe.dataset
  if name != config.dataset.name:
    probe.dataset = ml_collections.ConfigDict(dict(
        name=name, data_dir=config.dataset.data_dir,
        normalization=config.dataset.get("normalization", "dataset")))
  probe.num_epochs = config.linear_probe.num_epochs
  return probe
