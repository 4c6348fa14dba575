"""CAT-KD: class attention transfer based knowledge distillation (Guo, Yan, Li and Lin, CVPR 2023).

As the authors' code computes it: GzyAftermath/CAT-KD @ 4467073ca31b9929e7c45f5a6761e5e1b7c9442f,
mdistiller/distillers/CAT_KD.py (`CAT_KD.forward_train`, `CAT_loss`, `_mask`), with the
repository's configs/cifar100 yamls. Its networks (`*_test`, `if_test: True`) end in a bias-free
1×1 conv holding the classifier's weights: the class activation maps (CAMs) of a network are
its classifier kernel applied at every position of the map it pools, A [B, h, w, N], and its
logits their spatial mean. With P the adaptive average pool to r×r (`cam_resolution`, torch's
windows) and, optionally, n(·) the L2 normalisation of each r×r map (torch's F.normalize over
dims (2, 3), ε 1e-12):

  L_CAT = mean over the kept (image, class) maps and their r×r cells of (n(P(A_s)) − n(P(A_t)))²
  L     = ce_weight · CE(z_s, y) + cat_weight · L_CAT        (CE left out with `only_cat`)

The teacher's maps are constants; the student's carry the gradient into its classifier's kernel
and its backbone (jaxkd's networks give both maps with `class_maps=True`, Method.class_maps).

Options of the reference, each a hyper-parameter here:
  `binarize`: the teacher's maps, before pooling, become 1 where A_t − thr > 0 and 0 elsewhere,
    thr = Σ_{h,w} |A_t| / (h·w) per map (an L1 norm: the mean of |A_t|, not of A_t); the
    student's maps are untouched.
  `partial` (IF_OnlyTransferPartialCAMs): only the maps of some classes are transferred, chosen
    per image from the teacher's scores s_t = the spatial means of A_t. `strategy` 0: with l the
    `cams_nums`-th largest score, the classes scoring strictly more than l (cams_nums − 1 of
    them); `strategy` 1: with l the score at descending rank N − 1 − cams_nums (the reference's
    99 − CAMs_Nums, for its 100 classes), the classes scoring at most l (cams_nums + 1 of them).
    The reference gathers the kept maps with `masked_select` and gives up on the selection (all
    maps are transferred) when their total number is not a multiple of the batch size; every
    per-map step commutes with the gathering, so L_CAT is the mean over the kept maps.

Where jaxkd differs from the reference: a zoo network keeps its classifier's bias (the `*_test`
networks have none), so the student's logits z_s are the spatial mean of its CAMs plus the bias;
the CAMs themselves are bias-free as the reference's, and the teacher's scores that select the
classes are the bias-free means of its CAMs, as those of the reference's converted teacher.
The reference's 99 is N − 1 here (the same on CIFAR-100).

Defaults are the authors' CIFAR-100 configs: CFG.CAT_KD (mdistiller/engine/cfg.py) under
configs/cifar100/CAT_KD/res32x4_res8x4.yaml (CE 1, β 15, resolution 2, no normalisation), and
per pair the β, resolution and normalisation of its yaml (CATKD_CIFAR100_PAIRS). The reference's
numbers are reproduced in tests (tests/data/golden_modern.npz, prefixes catkd*).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd.errors import UserError
from jaxkd.methods.base import Method, Outputs
from jaxkd.methods.connectors import adaptive_avg_pool2d
from jaxkd.methods.losses import cross_entropy, topk_correct
from jaxkd.methods.numerics import l2_normalize

# CFG.CAT_KD with configs/cifar100/CAT_KD/res32x4_res8x4.yaml (CE_WEIGHT, CAT_loss_weight,
# CAM_RESOLUTION, onlyCAT, IF_NORMALIZE; the others CFG's defaults).
CATKD_DEFAULTS = dict(ce_weight=1.0, cat_weight=15.0, cam_resolution=2, only_cat=False,
                      normalize=False, binarize=False, partial=False, cams_nums=100, strategy=0)

# (teacher, student) -> (CAT_loss_weight, CAM_RESOLUTION, IF_NORMALIZE) of each
# configs/cifar100/CAT_KD/*.yaml, under the jaxkd zoo's model names.
CATKD_CIFAR100_PAIRS: dict[tuple[str, str], tuple[float, int, bool]] = {
    ("resnet32x4", "resnet8x4"): (15.0, 2, False),
    ("resnet32x4", "ShuffleV1"): (600.0, 4, True),
    ("resnet32x4", "ShuffleV2"): (600.0, 4, True),
    ("ResNet50", "MobileNetV2"): (40.0, 2, True),
    ("resnet56", "resnet20"): (0.7, 2, False),
    ("resnet110", "resnet32"): (1.8, 2, False),
    ("vgg13", "MobileNetV2"): (15.0, 2, True),
    ("vgg13", "vgg8"): (4.5, 2, False),
    ("wrn_40_2", "ShuffleV1"): (80.0, 4, True),
    ("wrn_40_2", "wrn_16_2"): (12.0, 2, False),
    ("wrn_40_2", "wrn_40_1"): (1.5, 2, False),
}


def pair_defaults(teacher: str, student: str) -> dict[str, object]:
  """The pair's β, CAM resolution and normalisation from its CIFAR-100 yaml (none: the
  defaults)."""
  if (teacher, student) not in CATKD_CIFAR100_PAIRS:
    return {}
  weight, resolution, normalize = CATKD_CIFAR100_PAIRS[(teacher, student)]
  return dict(cat_weight=weight, cam_resolution=resolution, normalize=normalize)


def binarize(cams: jax.Array) -> jax.Array:
  """1.0 where A − Σ_{h,w}|A| / (h·w) > 0, else 0.0, per map of NHWC maps A [B, h, w, N]."""
  cams = cams.astype(jnp.float32)
  threshold = jnp.mean(jnp.abs(cams), axis=(1, 2), keepdims=True)
  return (cams - threshold > 0).astype(jnp.float32)


def class_mask(teacher_scores: jax.Array, cams_nums: int, strategy: int) -> jax.Array:
  """The classes whose maps are transferred, bool [B, N], from the teacher's scores [B, N]:
  strategy 0, those scoring strictly more than the `cams_nums`-th largest score; strategy 1,
  those scoring at most the score of descending rank N − 1 − `cams_nums` (0-based)."""
  num_classes = teacher_scores.shape[-1]
  rank = cams_nums - 1 if strategy == 0 else num_classes - 1 - cams_nums
  if not 0 <= rank < num_classes:
    raise UserError(f"catkd's cams_nums={cams_nums} with strategy {strategy} picks descending "
                    f"rank {rank} of {num_classes} classes; choose cams_nums so that it lies in "
                    f"[0, {num_classes - 1}]")
  scores = jax.lax.stop_gradient(teacher_scores.astype(jnp.float32))
  cut = -jnp.sort(-scores, axis=-1)[:, rank:rank + 1]
  return scores > cut if strategy == 0 else scores <= cut


def pooled_maps(cams: jax.Array, resolution: int, normalize: bool) -> jax.Array:
  """P(A), each map optionally L2-normalised over its r×r cells: [B, r, r, N], float32."""
  pooled = adaptive_avg_pool2d(cams.astype(jnp.float32), (resolution, resolution))
  if not normalize:
    return pooled
  b, _, _, n = pooled.shape
  flat = l2_normalize(pooled.reshape(b, resolution * resolution, n), axis=1)
  return flat.reshape(pooled.shape)


def cat_loss(cams_s: jax.Array, cams_t: jax.Array, resolution: int, normalize: bool,
             keep: Optional[jax.Array] = None) -> jax.Array:
  """L_CAT (unweighted): the mean of (n(P(A_s)) − n(P(A_t)))² over the maps kept by `keep`
  (bool [B, N]; None: all), or over all maps when their count is not a multiple of B (the
  reference's `_mask`). The teacher's maps are constants."""
  s = pooled_maps(cams_s, resolution, normalize)
  t = jax.lax.stop_gradient(pooled_maps(cams_t, resolution, normalize))
  squares = jnp.square(s - t)
  if keep is None:
    return jnp.mean(squares)
  kept = jnp.sum(keep)
  weights = jnp.where(kept % keep.shape[0] == 0, keep, True).astype(jnp.float32)
  cells = resolution * resolution
  return jnp.sum(squares * weights[:, None, None, :]) / (jnp.sum(weights) * cells)


def catkd_terms(cams_s: jax.Array, cams_t: jax.Array, hparams: ml_collections.ConfigDict
                ) -> tuple[jax.Array, Optional[jax.Array]]:
  """(L_CAT unweighted, the classes kept or None) with the options of `hparams` (binarize,
  partial with cams_nums and strategy, cam_resolution, normalize)."""
  scores = jnp.mean(cams_t.astype(jnp.float32), axis=(1, 2))
  if hparams.binarize:
    cams_t = binarize(cams_t)
  keep = (class_mask(scores, int(hparams.cams_nums), int(hparams.strategy))
          if hparams.partial else None)
  return cat_loss(cams_s, cams_t, int(hparams.cam_resolution), bool(hparams.normalize),
                  keep), keep


def catkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                    hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) (not with `only_cat`) + cat_weight · L_CAT on both networks'
  'class_maps'.

  Metrics: loss, loss_ce, loss_cat (unweighted), cat_kept (the share of maps transferred), top1.
  """
  logits = student_out["logits"]
  loss_ce = cross_entropy(logits, labels)
  loss_cat, keep = catkd_terms(student_out["class_maps"], teacher_out["class_maps"], hparams)
  loss = hparams.cat_weight * loss_cat
  if not hparams.only_cat:
    loss = loss + hparams.ce_weight * loss_ce
  kept = jnp.mean(keep.astype(jnp.float32)) if keep is not None else jnp.ones(())
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_cat": loss_cat, "cat_kept": kept,
                "top1": topk_correct(logits, labels, 1).mean()}


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The CAM resolution ≥ 1; the strategy 0 or 1; cams_nums ≥ 0, and ≥ 2 for strategy 0 (it
  keeps cams_nums − 1 classes)."""
  def refuse(key, value, allowed, example):
    raise UserError(f"catkd's {key} is {value!r}; it must be {allowed}: set e.g. "
                    f"--config.method.{key}={example}")
  if not (isinstance(hparams.cam_resolution, int) and hparams.cam_resolution >= 1):
    refuse("cam_resolution", hparams.cam_resolution, "an integer >= 1", 2)
  if hparams.strategy not in (0, 1):
    refuse("strategy", hparams.strategy, "0 (top classes) or 1 (lowest classes)", 0)
  least = 2 if hparams.strategy == 0 else 0
  if hparams.partial and not (isinstance(hparams.cams_nums, int) and hparams.cams_nums >= least):
    refuse("cams_nums", hparams.cams_nums, f"an integer >= {least} with strategy "
           f"{hparams.strategy} (strategy 0 keeps cams_nums - 1 classes)", 10)


METHOD = Method(name="catkd", loss=catkd_objective, defaults=CATKD_DEFAULTS,
                pair_defaults=pair_defaults, class_maps=True, check_hparams=check_hparams)
