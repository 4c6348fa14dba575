"""The embedded demo: teacher → students on the handwritten digits scikit-learn ships.

Trains a resnet20 teacher, then a resnet8 student distilled with KD, with SSKD (after training
the SS module on the frozen teacher), with HSAKD (after training the auxiliary classifiers on the
frozen teacher), and alone with CE, and prints a table of held-out top-1. Offline; a few minutes
on 2 CPU cores.

    python -m jaxkd.main --config configs/demo.py --workdir runs/demo

`configs/demo.py:runlocal` shrinks it further (a smoke run of a few seconds of training).

EGA, with a self-supervised teacher, is a demo of its own (its teacher is not the one above):
a resnet20 pretrained by SimCLR on the digits without their labels (stage `pretrain`), frozen;
a resnet8 student distilled by EGA (its teacher head trained beside it), then alone with CE; and
a linear probe on the EGA student's frozen features (stage `linear_probe`). A few minutes too:

    python -m jaxkd.main --config configs/demo.py:ega --workdir runs/demo_ega

`configs/demo.py:ega,compare` adds the reference's comparison methods on the same joint
embeddings (kd, hint, rkd, pkt, crd) as baselines, one student stage each.

The classic baselines of the CRD, SSKD and HSAKD tables, each distilling the same resnet8 from
the same resnet20 teacher (AB and FSP after their student preparation, FT after training its
paraphraser on the teacher), then KD and the student alone:

    python -m jaxkd.main --config configs/demo.py:baselines --workdir runs/demo_baselines

The methods of today's papers against the same teacher, each distilling the same resnet8: KD,
then ReviewKD, OFD, DIST, NKD, ICKD, SRD, CTKD (on KD and on DKD), DKD with logit
standardization switched on (`method_overrides.dkd.logit_standardize=True`), KD stepped by DOT's
optimiser, MLKD (on the weak and strong view of each digit), CAT-KD, SimKD (its row scores the
network it deploys: the student's backbone, its projector and the teacher's classifier), and the
student alone:

    python -m jaxkd.main --config configs/demo.py:modern --workdir runs/demo_modern
"""

import ml_collections

from configs import default
from configs.ega import common as ega_recipes


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset.name = "digits"
  config.teacher.name = "resnet20"
  config.teacher.num_epochs = 15
  config.student.name = "resnet8"
  config.baselines = "sskd,hsakd,ce"
  # The digits are small: the teachers' heads need 5 epochs, not the reference's 60 / 100.
  config.method_overrides = ml_collections.ConfigDict(dict(
      sskd=dict(teacher_epochs=5, teacher_milestones=(3, 4)),
      hsakd=dict(teacher_epochs=5, teacher_lr=0.1, teacher_milestones=(3, 4))))
  config.num_epochs = 15
  config.batch_size = 64
  config.eval_batch_size = 120
  config.optimizer.lr = 0.05
  config.schedule.milestones = (9, 11, 13)   # the reference 150/180/210 of 240, scaled
  config.log_every_steps = 50
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 200
  tokens = [t for t in arg.split(",") if t]
  if "baselines" in tokens:
    _use_baselines(config)
    arg = ",".join(t for t in tokens if t != "baselines")
  if "modern" in tokens:
    _use_modern(config)
    arg = ",".join(t for t in tokens if t != "modern")
  if "ega" in tokens:
    _use_ega(config, runlocal="runlocal" in tokens, compare="compare" in tokens)
    arg = ",".join(t for t in tokens if t not in ("ega", "compare"))
  elif "compare" in tokens:
    raise ValueError("config argument 'compare' belongs to the EGA demo: use 'ega,compare'")
  if arg:
    default.apply_arg(config, arg)
    if "runlocal" in arg.split(","):
      for hparams in config.method_overrides.values():
        for field in ("teacher_epochs", "init_epochs"):
          if field in hparams:
            hparams[field] = 1
        for field in [key for key in hparams if key.endswith("_milestones")]:
          hparams[field] = ()   # inside the one epoch left
  return config


BASELINES = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "kdsvd",
             "crd", "crd_kd", "dkd")


def _use_baselines(config: ml_collections.ConfigDict) -> None:
  """The classic baselines demo (see the module docstring)."""
  config.method = default.method_fields("kd", config.teacher.name, config.student.name)
  config.baselines = ",".join(BASELINES + ("ce",))
  # The reference's preparation stages are 30 of 240 epochs and DKD's warm-up 20 of 240: about
  # the same shares of the demo's 15 epochs. The digits have about 1,300 examples of other classes
  # per example: CRD's 16,384 negatives would repeat each one twelve times.
  config.method_overrides = ml_collections.ConfigDict(dict(
      ab=dict(init_epochs=2), fsp=dict(init_epochs=2), ft=dict(init_epochs=2),
      crd=dict(nce_k=1024), crd_kd=dict(nce_k=1024), dkd=dict(warmup=1)))


MODERN = ("reviewkd", "ofd", "dist", "nkd", "ickd", "srd", "ctkd", "ctkd_dkd", "dkd", "dot",
          "mlkd", "catkd", "simkd")


def _use_modern(config: ml_collections.ConfigDict) -> None:
  """The modern methods demo (see the module docstring)."""
  config.method = default.method_fields("kd", config.teacher.name, config.student.name)
  config.baselines = ",".join(MODERN + ("ce",))
  # ReviewKD's and DKD's warm-ups (20 of 240 epochs) and CTKD's temperature curriculum (10 of
  # 240) take about the same share of the demo's 15 epochs. CAT-KD's un-normalised maps at β 15
  # (its resnet32x4 → resnet8x4 setting) diverge on the digits' 2×2 maps; its normalised maps
  # (the setting of its pairs with normalisation) do not.
  config.method_overrides = ml_collections.ConfigDict(dict(
      reviewkd=dict(warmup_epochs=1), dkd=dict(warmup=1, logit_standardize=True),
      ctkd=dict(decay_loops=1.0), ctkd_dkd=dict(decay_loops=1.0), catkd=dict(normalize=True)))


def _use_ega(config: ml_collections.ConfigDict, runlocal: bool, compare: bool) -> None:
  """The EGA demo (see the module docstring)."""
  config.teacher.pretrain = "simclr"
  config.method = default.method_fields("ega", config.teacher.name, config.student.name)
  comparison = [f"ega_{d}" for d in ega_recipes.COMPARISON] if compare else []
  config.baselines = ",".join(comparison + ["ce"])
  # The digits have about 1,300 examples of other classes per example: CRD's 16,384 negatives
  # would repeat each one twelve times.
  config.method_overrides = ml_collections.ConfigDict(
      dict(ega_crd=dict(nce_k=1024)) if compare else {})
  config.linear_probe.update(dataset="digits", num_epochs=1 if runlocal else 10, lr=0.1,
                             milestones=() if runlocal else (6, 8))
