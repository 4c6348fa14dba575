"""Training steps of a registered method through the trainer's own step function
(`jaxkd.steps.train_step`, the method's bridge included) on a given device mesh, for tests that
compare 1 and 4 devices."""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from jaxkd import networks
from jaxkd import parallel
from jaxkd import steps
from jaxkd.data import views as views_lib
from jaxkd.methods import get_method
from jaxkd.optim import learning_rate_schedule, make_optimizer
from jaxkd.state import TrainState

IMAGE_SHAPE = (8, 8, 3)
NUM_CLASSES = 10


def random_batches(num_steps: int, batch_size: int = 8, seed: int = 0, num_views: int = 1
                   ) -> list[dict[str, Any]]:
  """`num_steps` batches of random 8×8 images and labels of 10 classes; with `num_views` > 1
  each image has that many views ([B, V, H, W, C])."""
  rng = np.random.default_rng(seed)
  views = (num_views,) if num_views > 1 else ()
  return [{"image": rng.normal(size=(batch_size,) + views + IMAGE_SHAPE).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)}
          for _ in range(num_steps)]


def train_steps(mesh: jax.sharding.Mesh, name: str, batches: Sequence[dict[str, Any]],
                teacher: str = "resnet8x4", student: str = "resnet8", lr: float = 0.05
                ) -> tuple[TrainState, list[dict[str, Any]]]:
  """The student's state after one step per batch of method `name` (SGD as configs/default.py
  at learning rate `lr`), from fixed initial variables, and each step's metrics; on the host."""
  method = get_method(name)
  hparams = method.hparams()
  teacher_net = networks.build_network(teacher, NUM_CLASSES)
  teacher_vars = networks.init_variables(teacher_net, IMAGE_SHAPE, 1, mesh)
  bridge = method.bridge(16, hparams) if method.bridge else None
  network = networks.build_network(student, NUM_CLASSES).clone(bridge=bridge)
  variables = networks.init_variables(network, IMAGE_SHAPE, 0, mesh,
                                      networks.teacher_output_shapes(teacher_net, teacher_vars,
                                                                     IMAGE_SHAPE))
  config = default.get_config()
  schedule = learning_rate_schedule(config, lr, 1, len(batches))
  tx = make_optimizer(config, schedule)
  state = parallel.replicate(TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])), mesh)
  step = jax.jit(functools.partial(
      steps.train_step, network=network, teacher_network=teacher_net, loss=method.loss,
      hparams=hparams, tx=tx, schedule=schedule, steps_per_epoch=len(batches),
      student_views_apart=method.student_views_apart))
  metrics = []
  for batch in batches:
    state, m = step(state, teacher_vars, parallel.to_global(batch, mesh))
    metrics.append(m)
  return jax.device_get((state, metrics))


def one_and_four_devices(name: str, num_steps: int = 2, **kwargs: Any
                         ) -> tuple[tuple[TrainState, list], tuple[TrainState, list]]:
  """`train_steps` of the same batches (as many views per image as the method's) on a mesh of 1
  and of 4 CPU devices."""
  batches = random_batches(num_steps, num_views=views_lib.num_views(get_method(name).views))
  one = train_steps(parallel.create_mesh(jax.devices()[:1]), name, batches, **kwargs)
  four = train_steps(parallel.create_mesh(jax.devices()[:4]), name, batches, **kwargs)
  return one, four


def assert_same_run(one: tuple[TrainState, list], four: tuple[TrainState, list],
                    terms: Sequence[str]) -> None:
  """Equal metrics `terms` at every step (rtol 1e-5) and equal parameters and batch statistics
  (the step's gradients applied) at the end (rtol 1e-4, atol 1e-6)."""
  (one_state, one_metrics), (four_state, four_metrics) = one, four
  for a, b in zip(one_metrics, four_metrics):
    for term in terms:
      assert np.isfinite(a[term]), (term, a[term])
      np.testing.assert_allclose(a[term], b[term], rtol=1e-5, err_msg=term)
  leaves_one = jax.tree_util.tree_leaves_with_path((one_state.params, one_state.batch_stats))
  leaves_four = jax.tree.leaves((four_state.params, four_state.batch_stats))
  assert len(leaves_one) == len(leaves_four)
  for (path, a), b in zip(leaves_one, leaves_four):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
