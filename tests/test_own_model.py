"""A network of the user's own, registered with jaxkd.models.register: distilled into with KD,
SSKD and AT on mock CIFAR-100; a network without the taps a method reads is refused by name."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

import helpers

from jaxkd import models
from jaxkd import plan
from jaxkd import train
from jaxkd.data import sources
from jaxkd.errors import UserError
from jaxkd.models import layers


class TinyNet(nn.Module):
  """conv -> BN -> ReLU (stem), three conv stages (strides 1, 2, 2), spatial mean, Linear."""
  num_classes: int
  with_maps: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False, preact=False):
    x = nn.relu(layers.BatchNorm(dtype=self.dtype)(nn.Conv(8, (3, 3), dtype=self.dtype)(x),
                                                   not train))
    feats = collections.OrderedDict(stem=x)
    for stage, stride in enumerate((1, 2, 2), start=1):
      pre = nn.Conv(8 * stride, (3, 3), strides=stride, dtype=self.dtype)(x)
      x = nn.relu(pre)
      if self.with_maps:
        feats[f"stage{stage}"] = pre if preact else x
    feats["pooled"] = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(feats["pooled"]), feats


def _register(name, **kwargs):
  if name not in models.MODEL_NAMES and name not in _registered:
    models.register(name, lambda num_classes, dtype=jnp.float32: TinyNet(num_classes, dtype=dtype,
                                                                         **kwargs))
    _registered.add(name)


_registered = set()


def _config(tmp_path, method, baselines=""):
  _register("tiny_own_net")
  _register("tiny_pooled_only", with_maps=False)
  config = helpers.mock_cifar_config(tmp_path, "resnet8", "tiny_own_net", method, baselines)
  config.method_overrides = ml_collections.ConfigDict(dict(
      sskd=dict(teacher_epochs=1, teacher_milestones=())))
  return config


def test_a_registered_network_is_distilled_with_kd_sskd_and_at(tmp_path):
  config = _config(tmp_path, "kd", "sskd,at")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "data_source", helpers.mock_cifar100)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  stages = {r["stage"]: r for r in results}
  assert set(stages) == {"teacher", "student_kd", "teacher_sskd", "student_sskd", "student_at"}
  for name in ("student_kd", "student_sskd", "student_at"):
    assert stages[name]["model"] == "tiny_own_net" and 0 <= stages[name]["top1_last"] <= 100


def test_a_network_without_the_taps_a_method_reads_is_refused_by_name(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "data_source", helpers.mock_cifar100)
  config = _config(tmp_path, "at")
  config.student.name = "tiny_pooled_only"
  with pytest.raises(UserError, match="method 'at' reads the stage maps taps.1:-1. as spatial "
                                      "maps .* student 'tiny_pooled_only' gives only stem "
                                      r"\[32, 32, 8\], pooled \[16\]"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  # AT pairs the stage maps one to one: 3 against VGG's 4 is refused.
  config.student.name, config.teacher.name = "tiny_own_net", "vgg8"
  with pytest.raises(UserError, match="'tiny_own_net' gives 3 and teacher 'vgg8' 4"):
    plan.make_plan(config, None, jax.sharding.Mesh(jax.devices()[:1], ("data",)))
  config.student.name, config.teacher.name = "tiny_pooled_only", "resnet8"
  # KD reads only the logits; a name already taken is refused.
  config.method.name = "kd"
  plan.make_plan(config, None, jax.sharding.Mesh(jax.devices()[:1], ("data",)))
  with pytest.raises(UserError, match="'resnet8' is taken"):
    models.register("resnet8", TinyNet)
