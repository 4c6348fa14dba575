"""Networks as the trainer builds them: a zoo backbone with a method's heads, initialised under
jit and replicated over the mesh, and what a stage needs to know of them (output shapes, which
parameters the taps depend on, the variables that are exported).

Free of TensorFlow and the input pipeline: `experiments/benchmark.py` builds its step from here
on a machine without TensorFlow.
"""

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxkd import checkpoint
from jaxkd import models
from jaxkd import parallel
from jaxkd.errors import UserError
from jaxkd.methods.base import HeadsFactory
from jaxkd.tree_check import first_mismatch


class Network(nn.Module):
  """A zoo backbone plus a method's heads, returning one dict of outputs.

  {'logits': [R, N], 'feats': {tap: array}, ...whatever the heads add}. The backbone's
  variables live under 'backbone', so a reference checkpoint maps onto them unchanged.
  With `frozen_backbone` the backbone always runs in inference mode and passes no gradient, as
  when only a method's heads are trained on a finished teacher.
  A method's `bridge` (variables under 'bridge') runs after the heads when the training step
  passes the teacher's outputs and the batch, and at initialisation to create its variables.
  With `preact` the backbone's stage taps are taken before their last ReLU.
  """
  backbone: nn.Module
  heads: Optional[nn.Module] = None
  frozen_backbone: bool = False
  bridge: Optional[nn.Module] = None
  preact: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, teacher_out: Optional[Any] = None,
               batch: Optional[Any] = None) -> dict[str, Any]:
    # Only asked for when needed: a CLIP tower has no pre-activation taps.
    preact = {"preact": True} if self.preact else {}
    logits, feats = self.backbone(x, train=train and not self.frozen_backbone, **preact)
    if self.frozen_backbone:
      logits, feats = jax.lax.stop_gradient((logits, feats))
    out = {"logits": logits, "feats": feats}
    if self.heads is not None:
      out.update(self.heads(out, train=train))
    if self.bridge is not None and (teacher_out is not None or self.is_initializing()):
      out.update(self.bridge(out, teacher_out, batch, train=train))
    return out


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """bfloat16 with --config.half_precision (params, optimiser state and losses stay float32)."""
  return jnp.bfloat16 if config.get("half_precision", False) else jnp.float32


def backbone_only(variables: Any) -> Any:
  """The 'backbone' subtree of every collection: a network's variables without its heads."""
  return {col: {"backbone": tree["backbone"]} for col, tree in variables.items()}


def without_bridge(variables: Any) -> Any:
  """A network's variables without a method's bridge (what is exported as the network)."""
  return {col: {k: v for k, v in tree.items() if k != "bridge"}
          for col, tree in variables.items()}


def build_network(model_name: str, num_classes: int, heads: Optional[HeadsFactory] = None,
                  hparams: Optional[ml_collections.ConfigDict] = None,
                  dtype: Any = jnp.float32, backbone_num_classes: Optional[int] = None
                  ) -> Network:
  """A zoo backbone with optional heads (built by `heads(num_classes, hparams, backbone)`);
  the backbone's own classifier has `backbone_num_classes` outputs if given."""
  backbone = models.get_model(model_name, backbone_num_classes or num_classes, dtype=dtype)
  return Network(backbone=backbone,
                 heads=heads(num_classes, hparams, backbone) if heads else None)


def run_once_options(mesh: jax.sharding.Mesh) -> Optional[dict[str, Any]]:
  """Compiler options of a program that runs once (an initialisation) on the mesh.

  On CPU, LLVM's optimisation of the unrolled random-number code of an init costs seconds per
  network and saves nothing on a single run, so it is compiled unoptimised (the values may
  then differ from an optimised compile in the last bit; every run compiles them the same way).
  """
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_backend_optimization_level": 0}
  return None


def init_variables(network: Network, image_shape: tuple[int, ...], seed: int,
                   mesh: jax.sharding.Mesh, teacher_out: Optional[Any] = None) -> Any:
  """Initialises the network under jit, replicated over the mesh.

  `teacher_out`: the shapes of the teacher's outputs for one image, handed to the method's
  bridge so that its modules know the teacher's widths (e.g. FitNet's regressor).
  """
  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh),
                     compiler_options=run_once_options(mesh))
  def init(rng):
    sample = None if teacher_out is None else jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype), teacher_out)
    return network.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False,
                        teacher_out=sample)
  return dict(init(jax.random.key(seed)))


def teacher_output_shapes(network: Network, variables: Any, image_shape: tuple[int, ...]
                          ) -> Any:
  """The shapes and dtypes of `network`'s outputs for one image (nothing is computed)."""
  return jax.eval_shape(lambda v: network.apply(
      v, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False), variables)


def feature_parameters(backbone: nn.Module, variables: Any, image_shape: tuple[int, ...]
                       ) -> Any:
  """True on every backbone parameter that some tap depends on, False on the others (the
  classifier): RepDistiller's `get_feat_modules`, found by which parameters receive a gradient
  from a random projection of all the taps (inference mode, two random images)."""
  images = jax.random.normal(jax.random.key(0), (2,) + tuple(image_shape), jnp.float32)

  def projection(params):
    _, feats = backbone.apply(dict(variables, params=params), images, train=False)
    leaves = jax.tree.leaves(feats)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return sum(jnp.sum(f.astype(jnp.float32) * jax.random.normal(k, f.shape))
               for f, k in zip(leaves, keys))

  grads = jax.jit(jax.grad(projection))(variables["params"])
  return jax.tree.map(lambda g: bool(jnp.any(g != 0)), grads)


def variable_shapes(network: Network, image_shape: tuple[int, ...]) -> Any:
  """The tree of `network`'s variables as `jax.ShapeDtypeStruct`s, nothing initialised: nested
  dicts in the order the layers are created (a reference PyTorch state_dict's order), unlike
  `jax.eval_shape`'s output, whose dicts come back sorted."""
  captured = {}

  def abstract(tree: Any) -> Any:
    if isinstance(tree, Mapping):
      return {k: abstract(v) for k, v in tree.items()}
    return jax.ShapeDtypeStruct(tree.shape, tree.dtype)

  def init() -> Any:
    variables = network.init(jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)),
                             train=False)
    captured["tree"] = abstract(variables)
    return variables

  jax.eval_shape(init)
  return captured["tree"]


def read_variables(network: Network, path: str, image_shape: tuple[int, ...],
                   what: str = "teacher checkpoint", sha256: Optional[str] = None,
                   remedy: str = "") -> Any:
  """The variables of `network` from a jaxkd variables file, checked to fit its tree (nothing is
  initialised: the tree comes from `jax.eval_shape`); see checkpoint.import_variables. A file
  that does not fit raises `checkpoint.Misfit` (see `misfit_error`)."""
  return checkpoint.import_variables(path, variable_shapes(network, image_shape), what, sha256,
                                     remedy)


def fitting_models(variables: Any, num_classes: int, image_shape: tuple[int, ...]) -> list[str]:
  """The zoo networks (`models.MODEL_NAMES`) whose variables for `num_classes` classes and
  images of `image_shape` have exactly the paths and shapes of `variables` (a few seconds:
  each network's tree is evaluated abstractly)."""
  fits = []
  for name in models.MODEL_NAMES:
    try:
      shapes = variable_shapes(build_network(name, num_classes), image_shape)
    except Exception:  # pylint: disable=broad-except  # A network these images do not suit.
      continue
    if first_mismatch(shapes, variables) is None:
      fits.append(name)
  return fits


def misfit_error(error: checkpoint.Misfit, num_classes: int, image_shape: tuple[int, ...],
                 flag: str) -> UserError:
  """`error` (a file that does not fit its network) extended with the zoo networks the file
  does fit and the `flag` that chooses one, or with the fact that none does."""
  fits = fitting_models(error.variables, num_classes, image_shape)
  if fits:
    return UserError(f"{error}; it fits {', '.join(fits)} (set {flag}={fits[0]})")
  shape = "x".join(str(d) for d in image_shape)
  return UserError(f"{error}; it fits none of the zoo's networks for {num_classes} classes and "
                   f"{shape} images")
