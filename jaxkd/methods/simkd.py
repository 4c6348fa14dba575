"""SimKD: knowledge distillation with the reused teacher classifier (Chen, Mei, Wang, Feng and
Chen, CVPR 2022).

As the authors' code computes it: DefangChen/SimKD @ 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01,
models/util.py (`SimKD`), train_student.py and the `simkd` branches of helper/loops.py
(`train_distill`, `validate_distill`). On the last stage maps f_s = taps[-2] of the student and
f_t of the teacher (RepDistiller's feat[-2]):

  (source, target) = (pool(f_s) to f_t's size, f_t) if s_H > t_H, else (f_s, pool(f_t) to f_s's)
  g_s = T(source),
  T = conv1×1(s_C → t_C/f)·BN·ReLU · conv3×3(pad 1)·BN·ReLU · conv1×1(→ t_C)·BN·ReLU
      (bias-free convs; f = `factor`; trained with the student, its BatchNorms in training mode)
  L_SimKD = mean over all entries of (g_s − target)²          (nn.MSELoss; the target a constant)
  L       = ce_weight · CE(z_s, y) + kd_weight · KD_T(z_s, z_t) + feat_weight · L_SimKD

where z_s are the student's own logits (its classifier is unused by the defaults, `-c 0 -d 0
-b 1` of the repository's README: CE and KD weigh 0). The prediction is the teacher's frozen
classifier reused on the spatial mean of the projected map, p_s = W_t · mean(g_s) + b_t: the
reference's training accuracy and its validation read p_s, and it is what SimKD deploys. So the
student stage evaluates and exports that network (Method.deployed): the student's backbone, the
projector (its BatchNorms on their running statistics) and the teacher's classifier, whose
`kernel` and `bias` are read once from the frozen teacher (`jaxkd.models.classifier_params`,
Method.teacher_constants). `python -m jaxkd.evaluate --method simkd --teacher <model>` reads the
exported file (see jaxkd.evaluate).

The reference compares heights only and pools to (H, H); here a map is pooled to the other's
(H, W), the same on square maps. Its teacher classifier reads a vector of the last stage map's
width, so teachers whose classifier reads another width (MobileNetV2, ShuffleV2: a head conv
comes between) are refused, as the reference would fail on them. The projector's init is
PyTorch's default (convs U(±1/sqrt(fan_in)), BN 1/0), as the reference leaves it. The
reference's numbers are reproduced in tests (tests/data/golden_modern.npz, prefix simkd).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import models
from jaxkd.errors import UserError
from jaxkd.methods.base import Deployment, Method, Outputs
from jaxkd.methods.connectors import adaptive_avg_pool2d, pool_to_smaller
from jaxkd.methods.losses import cross_entropy, distill_kl, topk_correct
from jaxkd.methods.objective import LAST_MAP, paired_taps, tap_shapes
from jaxkd.models import layers

# train_student.py's -c 0 -d 0 -b 1 (the README's command), --kd_T 4 and --factor 2.
SIMKD_DEFAULTS = dict(ce_weight=0.0, kd_weight=0.0, feat_weight=1.0, T=4.0, factor=2)


class Projector(nn.Module):
  """SimKD's `transfer`: conv1×1 (→ channels // factor) · BN · ReLU · conv3×3 (padding 1) · BN ·
  ReLU · conv1×1 (→ channels) · BN · ReLU, convs bias-free with PyTorch's default init;
  submodules `transfer_{0,1,3,4,6,7}` as the reference's Sequential indices. BatchNorms on the
  batch's statistics when `train`."""
  channels: int
  factor: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mid = self.channels // self.factor
    x = x.astype(jnp.float32)
    for conv, (width, k) in zip((0, 3, 6), ((mid, 1), (mid, 3), (self.channels, 1))):
      x = layers.conv(width, k, 1, (k - 1) // 2, kernel_init=layers.torch_default_kernel,
                      name=f"transfer_{conv}")(x)
      x = nn.relu(layers.BatchNorm(name=f"transfer_{conv + 1}")(x, use_running_average=not train))
    return x


def reuse_classifier(classifier: Any, maps: jax.Array) -> jax.Array:
  """The teacher's classifier on the spatial mean of `maps`: mean(g) @ kernel + bias."""
  pooled = jnp.mean(maps.astype(jnp.float32), axis=(1, 2))
  return pooled @ jnp.asarray(classifier["kernel"]) + jnp.asarray(classifier["bias"])


def simkd_loss(projected: jax.Array, target: jax.Array) -> jax.Array:
  """L_SimKD = mean of (g_s − target)² over all entries (nn.MSELoss); the target a constant."""
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  return jnp.mean(jnp.square(projected.astype(jnp.float32) - target))


class SimKDBridge(nn.Module):
  """SimKD's projector as a bridge: `bridge(student_out, teacher_out, batch, train)` ->
  {'simkd_projected': g_s, 'simkd_target': the teacher's (pooled) map, 'loss_simkd':
  L_SimKD, 'simkd_logits': p_s}, on the last stage maps (taps[-2]) of both sides; p_s needs the
  teacher's classifier as `teacher_out['constants']['classifier']` (teacher_classifier). The
  projector (`projector`) takes its width from the teacher's map, so `teacher_out` is needed at
  initialisation too."""
  factor: int = 2

  @nn.compact
  def __call__(self, student_out: Any, teacher_out: Optional[Any], batch: Optional[Any] = None,
               train: bool = False) -> dict[str, jax.Array]:
    del batch
    taps_s, taps_t = paired_taps(student_out, teacher_out, "SimKDBridge")
    source, target = pool_to_smaller(taps_s[-2].astype(jnp.float32),
                                     taps_t[-2].astype(jnp.float32))
    projected = Projector(target.shape[-1], self.factor, name="projector")(source, train)
    out = {"simkd_projected": projected, "simkd_target": target,
           "loss_simkd": simkd_loss(projected, target)}
    constants = teacher_out.get("constants")
    if constants is not None:
      out["simkd_logits"] = reuse_classifier(constants["classifier"], projected)
    return out


class DeployedSimKD(nn.Module):
  """What SimKD deploys: the student `backbone`, its last stage map pooled to `target_hw` when
  it is taller, the `projector` (running statistics unless `train`) and the teacher's
  `classifier` on its spatial mean. Returns {'logits': p_s, 'feats': the backbone's taps}."""
  backbone: nn.Module
  target_hw: tuple[int, int]
  channels: int
  num_classes: int
  factor: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
    _, feats = self.backbone(x, train=train)
    source = list(feats.values())[-2].astype(jnp.float32)
    if source.shape[1] > self.target_hw[0]:
      source = adaptive_avg_pool2d(source, self.target_hw)
    projected = Projector(self.channels, self.factor, name="projector")(source, train)
    pooled = jnp.mean(projected, axis=(1, 2))
    return {"logits": layers.Linear(self.num_classes, name="classifier")(pooled),
            "feats": feats}


def deployed_module(student_backbone: nn.Module, teacher_out: Any, num_classes: int,
                    hparams: ml_collections.ConfigDict) -> nn.Module:
  """Deployment.module: DeployedSimKD on the student with the teacher's last map's size and
  width (from the shapes of its outputs)."""
  target = list(teacher_out["feats"].values())[-2]
  return DeployedSimKD(backbone=student_backbone, target_hw=tuple(target.shape[1:3]),
                       channels=int(target.shape[-1]), num_classes=num_classes,
                       factor=int(hparams.factor))


def deployed_variables(trained: Any, constants: Any, hparams: ml_collections.ConfigDict) -> Any:
  """Deployment.variables: the student's backbone and the bridge's projector as trained, the
  teacher's classifier (the teacher constants)."""
  del hparams
  params, stats = trained["params"], trained["batch_stats"]
  return {"params": {"backbone": params["backbone"], "projector": params["bridge"]["projector"],
                     "classifier": dict(constants["classifier"])},
          "batch_stats": {"backbone": stats["backbone"],
                          "projector": stats["bridge"]["projector"]}}


def _host(x: Any) -> np.ndarray:
  """A replicated array's value on the host (this process's first shard when the array spans
  several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def teacher_classifier(teacher_name: str, teacher_variables: Any,
                       hparams: ml_collections.ConfigDict) -> dict[str, Any]:
  """Method.teacher_constants: {'classifier': {'kernel', 'bias'}} of the frozen teacher."""
  del hparams
  head = models.classifier_params(teacher_name, teacher_variables)
  return {"classifier": {key: _host(value) for key, value in head.items()}}


def simkd_objective(student_out: Outputs, teacher_out: Outputs, labels: jax.Array,
                    hparams: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = ce_weight · CE(z_s, y) + kd_weight · KD_T(z_s, z_t) + feat_weight · L_SimKD, z_s the
  student's own logits. Metrics: loss, loss_ce, loss_kd, loss_simkd (unweighted), top1 (of the
  reused classifier's prediction p_s, as the reference's training accuracy)."""
  logits = student_out["logits"]
  loss_ce = cross_entropy(logits, labels)
  loss_kd = distill_kl(logits, teacher_out["logits"], hparams.T)
  loss_simkd = student_out["loss_simkd"]
  loss = (hparams.ce_weight * loss_ce + hparams.kd_weight * loss_kd
          + hparams.feat_weight * loss_simkd)
  prediction = student_out.get("simkd_logits", logits)
  return loss, {"loss": loss, "loss_ce": loss_ce, "loss_kd": loss_kd, "loss_simkd": loss_simkd,
                "top1": topk_correct(prediction, labels, 1).mean()}


def simkd_bridge(num_data: int, hparams: ml_collections.ConfigDict) -> nn.Module:
  """The projector, trained with the student."""
  del num_data
  return SimKDBridge(factor=int(hparams.factor))


def check_hparams(hparams: ml_collections.ConfigDict) -> None:
  """The projector's `factor` must be an integer >= 1."""
  if not (isinstance(hparams.factor, int) and hparams.factor >= 1):
    raise UserError(f"simkd's factor is {hparams.factor!r}; it must be an integer >= 1 (the "
                    f"projector's middle width is the teacher's channels // factor): set e.g. "
                    f"--config.method.factor={SIMKD_DEFAULTS['factor']}")


def check_pair(teacher: str, student: str, num_classes: int) -> None:
  """The teacher's classifier must read a vector of its last stage map's width (it is reused
  on the projected map)."""
  del student
  taps = tap_shapes(teacher, num_classes)
  if len(taps) < 2:
    return  # Method.taps refuses it, naming what is missing.
  last_map, pooled = taps[-2][1][-1], taps[-1][1][-1]
  if last_map != pooled:
    raise UserError(
        f"SimKD reuses the teacher's classifier on a map of the width of its last stage map, "
        f"but teacher {teacher!r}'s classifier reads {pooled} features and its last stage map "
        f"({taps[-2][0]}) has {last_map} channels; choose a teacher whose classifier reads its "
        f"last stage map's spatial mean (a ResNet, WRN or VGG)")


METHOD = Method(name="simkd", loss=simkd_objective, defaults=SIMKD_DEFAULTS, bridge=simkd_bridge,
                taps=LAST_MAP, teacher_constants=teacher_classifier,
                deployed=Deployment(module=deployed_module, variables=deployed_variables),
                check_hparams=check_hparams, check_pair=check_pair)
