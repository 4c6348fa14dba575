"""Writes a trained network back to PyTorch: a jaxkd variables file -> a `.safetensors` state_dict.

    python -m jaxkd.export_student --model resnet8x4 \\
        --variables runs/c100/student_kd/student.msgpack --out student.safetensors

then, in PyTorch, on the reference architecture (RepDistiller's `models/` for the CIFAR zoo,
torchvision's for the `*_imagenet` networks):

    import safetensors.torch
    model = model_dict["resnet8x4"](num_classes=100)
    model.load_state_dict(safetensors.torch.load_file("student.safetensors"))

The keys are the reference zoo's `state_dict` keys, exactly those `jaxkd.import_teacher` reads:
the importer's mapping (`jaxkd.interop.torch_layout`) read backwards, convolution kernels back to
(O, I, kH, kW) and Linear kernels to (out, in), and each BatchNorm's `num_batches_tracked` written
as int64 0 (jaxkd keeps no such count; PyTorch reads it only with momentum=None). Only the
network is written: heads a method trains beside it (and a bridge, never exported) are left out
and named. The numbers of classes and of image channels are read off the file; it must fit
`--model` exactly, else the first misfit leaf is named, and the zoo networks it does fit. No
PyTorch is needed (safetensors' numpy API writes the file). Bad input ends with one line
`error: …` and exit status 2.
"""

import math
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from jaxkd import cli
from jaxkd.errors import UserError

# What the classes and channels of a network are assumed to be where no leaf depends on them.
_DEFAULT_SIZES = (100, 3)


def _image_shape(model: str, channels: int) -> tuple[int, int, int]:
  side = 224 if model.endswith("_imagenet") else 32
  return (side, side, channels)


def _shapes(model: str, num_classes: int, channels: int) -> dict[str, tuple[int, ...]]:
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  from jaxkd.tree_check import flat_shapes  # pylint: disable=g-import-not-at-top
  network = networks.build_network(model, num_classes)
  return flat_shapes(networks.variable_shapes(network, _image_shape(model, channels)))


def read_sizes(model: str, variables: Any) -> tuple[int, int]:
  """(classes, image channels) network `model`'s `variables` were made for, read off the leaves
  whose shapes depend on them (the classifier, the first convolution); (100, 3) where none
  of the file's leaves tells."""
  from jaxkd.tree_check import flat_shapes  # pylint: disable=g-import-not-at-top
  have = flat_shapes(variables)
  base = _shapes(model, 2, 1)

  def read(other: dict[str, tuple[int, ...]], default: int) -> int:
    for path, shape in base.items():
      if other[path] != shape and len(have.get(path, ())) == len(shape):
        axis = next(i for i, (a, b) in enumerate(zip(shape, other[path])) if a != b)
        return int(have[path][axis])
    return default

  return read(_shapes(model, 3, 1), _DEFAULT_SIZES[0]), read(_shapes(model, 2, 3),
                                                             _DEFAULT_SIZES[1])


def _in_order(template: Any, tree: Any) -> Any:
  """`tree` (of the same paths as `template`) with its dicts in `template`'s order."""
  if not isinstance(tree, dict):
    return tree
  return {key: _in_order(template[key], tree[key]) for key in template}


def torch_state_dict(model: str, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(PyTorch state_dict of numpy arrays, report) of network `model` in variables file `path`.

  Raises a UserError for an unknown model, a missing or unreadable file, or one that does not fit
  the model (naming the first misfit leaf and the zoo networks the file fits).
  """
  from jaxkd import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxkd import models  # pylint: disable=g-import-not-at-top
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  from jaxkd.interop import torch_layout  # pylint: disable=g-import-not-at-top
  from jaxkd.tree_check import first_mismatch, flat_shapes  # pylint: disable=g-import-not-at-top

  models.get_model(model, 1)  # An unknown name fails before the file is read.
  stored = checkpoint.restore_variables(path, "variables file")
  if not isinstance(stored, dict) or not all(
      isinstance(tree, dict) for tree in stored.values()):
    raise UserError(f"variables file {path!r} holds no Flax variables tree")
  left_out = sorted({name for tree in stored.values() for name in tree if name != "backbone"})
  backbone = {col: {"backbone": tree["backbone"]} for col, tree in stored.items()
              if "backbone" in tree}
  num_classes, channels = read_sizes(model, backbone)
  image_shape = _image_shape(model, channels)
  expected = networks.variable_shapes(networks.build_network(model, num_classes), image_shape)
  problem = first_mismatch(expected, backbone)
  if problem is not None:
    misfit = checkpoint.Misfit(f"variables file {path!r} does not fit {model} with "
                               f"{num_classes} classes: {problem}", backbone)
    raise networks.misfit_error(misfit, num_classes, image_shape, "--model")
  state_dict = torch_layout.flax_to_torch({col: _in_order(expected[col]["backbone"],
                                                          tree["backbone"])
                                           for col, tree in backbone.items()})
  report = {"num_classes": num_classes, "channels": channels, "left_out": left_out,
            "params": sum(math.prod(shape) for shape in flat_shapes(backbone["params"]).values())}
  return state_dict, report


def write_safetensors(path: str, state_dict: dict[str, Any], model: str) -> None:
  """Writes `state_dict` to `path` (atomically) with safetensors' numpy API."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from jaxkd import paths  # pylint: disable=g-import-not-at-top
  data = st_numpy.save(state_dict, metadata={"format": "pt", "model": model,
                                             "written_by": "jaxkd.export_student"})
  try:
    paths.write_atomically(path, data)
  except OSError as e:  # (paths.io_errors() would import TensorFlow for a local file.)
    raise UserError(f"cannot write --out {path!r} ({paths.reason(e)})") from None


def define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none, so it can
  be imported beside the other commands, whose flags share names)."""
  flags.DEFINE_string("model", None, "Zoo (or registered) network name, e.g. resnet8x4.")
  flags.DEFINE_string("variables", None, "jaxkd variables file (.msgpack) of it, e.g. "
                      "<workdir>/student_kd/student.msgpack.")
  flags.DEFINE_string("out", None, "Where to write the PyTorch state_dict (.safetensors).")
  flags.mark_flags_as_required(["model", "variables", "out"])


def main(argv):
  del argv  # No positional arguments (parse_flags).
  # JAX's INFO lines (which backends it probed) are noise here; -v 0 brings them back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  model, variables, out = flags.FLAGS.model, flags.FLAGS.variables, flags.FLAGS.out
  try:
    state_dict, report = torch_state_dict(model, variables)
    write_safetensors(out, state_dict, model)
  except UserError as e:
    sys.exit(cli.report(e))
  left_out = (f"; left out (not part of {model}): {', '.join(report['left_out'])}"
              if report["left_out"] else "")
  print(f"{variables} -> {out}: {model} ({report['num_classes']} classes, "
        f"{report['channels']} image channel(s)), {report['params']:,} parameters in "
        f"{len(state_dict)} state_dict entries{left_out}\n"
        f"load it with: model.load_state_dict(safetensors.torch.load_file({out!r}))")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a mistake (a missing flag, an extra argument) is one `error:` line and exit
  status 2."""
  return cli.parse_flags(flags.FLAGS, argv)


if __name__ == "__main__":
  cli.quiet_environment(sys.argv)
  define_flags()
  app.run(main, flags_parser=parse_flags)
