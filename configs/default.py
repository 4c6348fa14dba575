"""Defaults every recipe starts from: the reference CIFAR-100 schedule (RepDistiller/SSKD).

SGD momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05 ×0.1 at epochs 150/180/210,
KD with T = 4, CE weight 0.1, KD weight 0.9. Recipes import this and override a few fields.

    python -m jaxkd.main --config configs/default.py --workdir runs/cifar100_kd

`configs/default.py:<method>` (e.g. `:fitnet`, `:crd`, `:dkd`) distils with that method instead,
every hyper-parameter of it in `config.method` at its default, so that each one can be set on the
command line (`--config.method.feat_weight=50`).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jaxkd import defaults
from jaxkd import methods


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = defaults.dataset_config("cifar100")

  config.teacher = ml_collections.ConfigDict(dict(
      name="resnet32x4",
      checkpoint="",            # a jaxkd teacher file; '' = train it in stage `teacher`
      num_epochs=240,
      lr=-1.0,                  # -1: optimizer.lr
      pretrain="",              # '' = cross-entropy; 'simclr' = self-supervised (stage pretrain)
      keep="last",              # the trained teacher handed on: its last epoch, or the 'best'
                                # test top-1 of its evaluations (SSKD's teacher.py/student.py)
  ))
  config.student = ml_collections.ConfigDict(dict(name="resnet8x4"))

  # The distillation method and its hyper-parameters. None = the method's own default (KD:
  # T 4, ce_weight 0.1, kd_weight 0.9; the baselines: RepDistiller's `-r -a -b`, see the README),
  # so that --config.method.name=<another method> starts from that method's defaults.
  # `logit_standardize=True` standardizes the logits of KD, DKD, CTKD and MLKD and brings its
  # own defaults (KD, MLKD: T 2, kd_weight 9). `configs/default.py:<method>` lists every
  # hyper-parameter of <method> here instead.
  config.method = ml_collections.ConfigDict(dict(
      name="kd", T=placeholder(float), ce_weight=placeholder(float),
      kd_weight=placeholder(float), feat_weight=placeholder(float),
      logit_standardize=placeholder(bool)))
  # Comma-separated methods also trained on the student for the closing table ('ce' = alone).
  config.baselines = ""
  # Hyper-parameters of baseline methods that differ from their defaults: {method: {field: v}}.
  config.method_overrides = ml_collections.ConfigDict()
  # A linear classifier on the frozen features of the `config.method` student, trained after it
  # on `dataset` ('' = no probe; e.g. the run's own dataset, or stl10) with SGD at `lr`
  # (× 0.1 at the `milestones` epochs) and the optimizer's momentum and weight decay.
  config.linear_probe = ml_collections.ConfigDict(dict(
      dataset="", num_epochs=40, lr=0.1, milestones=(20, 30)))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4))
  config.schedule = ml_collections.ConfigDict(dict(
      name="multistep", milestones=(150, 180, 210), decay=0.1, warmup_epochs=0))

  config.num_epochs = 240
  config.batch_size = 64        # global, over all devices and hosts
  config.eval_batch_size = 128
  config.half_precision = False
  # Processes that read and augment the training batches ahead of the steps (grain's
  # multiprocessing; each makes whole batches). 0: threads of the training process, enough for
  # CIFAR on a CPU or a small GPU; raise it (about the host's spare cores) when the input is the
  # bottleneck, e.g. ImageNet's JPEG decoding on GPUs/TPUs (experiments/README.md, input).
  config.input_workers = 0
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  # Resuming (or reusing) a stage under a config that changes its result is refused; True goes
  # on with the new values (each stage's config.json keeps the old ones in its history).
  config.allow_changed_config = False
  # A stage of more than 10^9 steps (over a year even at 30 steps/s) is refused unless True;
  # past 2^31 - 1 steps (the int32 step counter) it is always refused.
  config.allow_huge_run = False

  if arg:
    apply_arg(config, arg)
  return config


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> None:
  """Shared config arguments; `runlocal` shrinks any recipe to a CPU smoke run (minutes)."""
  for token in filter(None, arg.split(",")):
    if token in methods.METHOD_NAMES or token in methods.ALIASES:
      config.method = method_fields(token, config.teacher.name, config.student.name)
    elif token == "runlocal":
      config.num_epochs = 2
      config.teacher.num_epochs = 2
      config.schedule.milestones = ()           # the recipe's are past the 2 epochs
      config.batch_size = 8
      config.eval_batch_size = 16
      config.log_every_steps = 5
      config.checkpoint_every_steps = 20
      config.dataset.num_train_examples = 64    # the first 64 / 32 examples of the splits
      config.dataset.num_eval_examples = 32
    else:
      raise ValueError(f"unknown config argument {token!r}; valid: runlocal, a method name "
                       "(configs may add more)")


def recipe_tokens(arg: str, valid: tuple[str, ...]) -> list[str]:
  """The comma-separated recipe arguments of `arg`; a ValueError names one not in `valid`."""
  tokens = [t for t in arg.split(",") if t]
  for token in tokens:
    if token not in valid:
      raise ValueError(f"unknown config argument {token!r}; valid: {', '.join(valid)}")
  return tokens


def cifar100_recipe(teacher: str, student: str, lr: float, nesterov: bool
                    ) -> ml_collections.ConfigDict:
  """The schedule the SSKD, HSAKD and EGA reference codes share on CIFAR-100: 240 epochs of
  batch 64, SGD (momentum 0.9, wd 5e-4) at `lr`, ×0.1 at epochs 150, 180 and 210; a teacher
  trained here gets 240 epochs at lr 0.05."""
  config = get_config()
  config.dataset.name = "cifar100"
  config.teacher.name = teacher
  config.teacher.num_epochs = 240
  config.teacher.lr = 0.05
  config.student.name = student
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=5e-4))
  config.schedule = ml_collections.ConfigDict(dict(
      name="multistep", milestones=(150, 180, 210), decay=0.1, warmup_epochs=0))
  config.num_epochs = 240
  config.batch_size = 64
  return config


def method_fields(name: str, teacher: str, student: str) -> ml_collections.ConfigDict:
  """`config.method` holding every hyper-parameter of method `name` at its default; the ones
  whose default depends on the teacher/student pair (e.g. DKD's β) or on a switch (e.g. KD's T
  under `logit_standardize`) are None placeholders, so the run's own pair and switches decide
  them unless they are set; a switch's own field is a None placeholder too (off)."""
  method = methods.get_method(name)
  per_pair = method.pair_defaults(teacher, student) if method.pair_defaults else {}
  undecided = set(per_pair) | method.switched_fields()
  fields = {key: placeholder(type(value)) if key in undecided else value
            for key, value in method.defaults.items()}
  for key, kind in method.switches().items():
    fields.setdefault(key, placeholder(kind))
  return ml_collections.ConfigDict(dict(fields, name=method.name))

