"""Converts a PyTorch teacher (`.pth` / `.pth.tar`) into a jaxkd teacher file.

    python -m jaxkd.import_teacher --arch resnet32x4 --num_classes 100 \\
        --out teachers/resnet32x4.msgpack save/models/resnet32x4_vanilla/ckpt_epoch_240.pth

then train with `--config.teacher.name=resnet32x4 --config.teacher.checkpoint=teachers/...`.
No PyTorch is needed, and nothing in the checkpoint is executed (see
`jaxkd.interop.torch_checkpoint`). The state dict is found under 'model' (RepDistiller, CRD,
mdistiller), 'state_dict' (SSKD, HSAKD's pretrained backbones) or 'net' (HSAKD), or is the file
itself; `module.` (DataParallel) and `backbone.` (SSKD / HSAKD wrappers, whose heads are dropped)
prefixes are removed. The converted variables must fit `--arch` exactly; otherwise the first
missing, unexpected or misshapen entry is named with its PyTorch key.
"""

import sys
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np

from jaxkd import cli
from jaxkd.errors import UserError
from jaxkd.interop import torch_layout

_ARCH = flags.DEFINE_string("arch", None, "Zoo network name, e.g. resnet32x4, wrn_40_2, vgg13.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes of the network's head.")
_OUT = flags.DEFINE_string("out", None, "Where to write the jaxkd teacher file (.msgpack).")
_KEY = flags.DEFINE_string("key", "", "Checkpoint entry holding the state dict; '' = guess "
                           "('model', 'state_dict', 'net', or the file itself).")
_PREFIX = flags.DEFINE_string("prefix", None, "Key prefix to keep and strip, e.g. 'backbone'; "
                              "unset = strip 'module.' and 'backbone.' when present; '' = none.")
flags.mark_flags_as_required(["arch", "out"])

# The same network, stored by another code base under other names: (their prefix, ours).
# SSKD and HSAKD register RepDistiller's MobileNetV2 classifier as a bare Linear.
_KEY_ALIASES = {
    "MobileNetV2": (("classifier.", "classifier.0."),),
    "MobileNetV2_stride1": (("classifier.0.", "classifier."),),
}


def input_size(arch: str) -> int:
  """Image side the network is built for: 224 for the ImageNet nets, 32 for the CIFAR zoo."""
  return 224 if arch.endswith("_imagenet") else 32


def template(arch: str, num_classes: int, channels: int = 3) -> Any:
  """Shapes of a jaxkd teacher's variables, `Network(get_model(arch)).init` evaluated abstractly:
  nested dicts of `jax.ShapeDtypeStruct` in the order the layers are created (which is the
  reference state_dict's order); see `networks.variable_shapes`."""
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  side = input_size(arch)
  return networks.variable_shapes(networks.build_network(arch, num_classes),
                                  (side, side, channels))


def _torch_view(variables: Any) -> dict[str, tuple[int, ...]]:
  """{PyTorch key: PyTorch shape} of the backbone of a variables tree, in the tree's dict order,
  each module's parameters followed by its batch statistics (PyTorch's BatchNorm order)."""
  return dict(torch_layout.torch_entries(
      variables.get("params", {}).get("backbone", {}),
      variables.get("batch_stats", {}).get("backbone", {}),
      lambda value, perm: tuple(np.shape(value)[i] for i in perm)))


def describe_misfit(expected: Any, got: Any) -> Optional[str]:
  """The first missing / unexpected / misshapen entry, in PyTorch terms; None if it fits."""
  want, have = _torch_view(expected), _torch_view(got)
  for key in want:
    if key not in have:
      return f"the checkpoint lacks {key!r} (shape {want[key]})"
  for key in have:
    if key not in want:
      return f"the checkpoint has {key!r} (shape {have[key]}), which the architecture lacks"
  for key in have:
    if want[key] != have[key]:
      return (f"{key!r} has shape {have[key]} in the checkpoint, the architecture expects "
              f"{want[key]}")
  return None


def apply_aliases(arch: str, state_dict: dict[str, Any]) -> dict[str, Any]:
  for theirs, ours in _KEY_ALIASES.get(arch, ()):
    if any(k.startswith(theirs) and not k.startswith(ours) for k in state_dict) and \
        not any(k.startswith(ours) for k in state_dict):
      state_dict = {(ours + k[len(theirs):] if k.startswith(theirs) else k): v
                    for k, v in state_dict.items()}
  return state_dict


def convert(path: str, arch: str, num_classes: int, key: str = "",
            prefix: Optional[str] = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, report) for the PyTorch checkpoint at `path` loaded into zoo network `arch`.

  variables = {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}} (float32 numpy),
  the tree a jaxkd teacher file holds. Raises `UserError` when the file is unsafe or unreadable,
  has no state dict, or does not fit `arch`.
  """
  from jaxkd.interop import torch_checkpoint  # pylint: disable=g-import-not-at-top
  from jaxkd.interop.torch_layout import torch_to_flax  # pylint: disable=g-import-not-at-top
  from jaxkd.models import get_model  # pylint: disable=g-import-not-at-top
  from jaxkd.tree_check import first_mismatch  # pylint: disable=g-import-not-at-top

  get_model(arch, num_classes)  # An unknown name fails before the file is read.
  checkpoint = torch_checkpoint.load(path)
  state_dict = torch_checkpoint.find_state_dict(checkpoint, key, path)
  state_dict, removed = torch_checkpoint.strip_wrappers(state_dict, prefix)
  state_dict = apply_aliases(arch, state_dict)
  # Keep float parameters float32 whatever the checkpoint stored (fp16/bf16/fp64 files).
  state_dict = {k: (np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                    or str(np.asarray(v).dtype) == "bfloat16" else v)
                for k, v in state_dict.items()}
  flat = torch_to_flax(state_dict)
  variables = {collection: {"backbone": tree} for collection, tree in flat.items() if tree}
  expected = template(arch, num_classes)
  if first_mismatch(expected, variables) is not None:
    detail = describe_misfit(expected, variables) or first_mismatch(expected, variables)
    hint = f" (prefixes removed: {', '.join(removed)})" if removed else ""
    raise UserError(f"{path!r} does not fit {arch} with {num_classes} classes: {detail}{hint}")
  n_params = sum(int(np.prod(v.shape)) for v in _leaves(variables["params"]))
  report = {"arch": arch, "num_classes": num_classes, "entries": len(state_dict),
            "params": n_params, "prefixes_removed": removed}
  return variables, report


def _leaves(tree: Any) -> list[Any]:
  if isinstance(tree, dict):
    return [leaf for v in tree.values() for leaf in _leaves(v)]
  return [tree]


def main(argv):
  # JAX's INFO lines (which backends it probed) are noise here; -v 0 brings them back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from jaxkd import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    variables, report = convert(argv[1], _ARCH.value, _NUM_CLASSES.value, _KEY.value,
                                _PREFIX.value)
    try:
      sha = checkpoint.export_variables(_OUT.value, variables)
    except OSError as e:
      raise UserError(f"cannot write --out {_OUT.value!r} ({e.strerror})") from None
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  removed = ", ".join(report["prefixes_removed"]) or "none"
  print(f"{argv[1]} -> {_OUT.value}: {report['arch']}, {report['params']:,} parameters from "
        f"{report['entries']} state_dict entries (prefixes removed: {removed}); sha256 {sha}\n"
        f"use it with: --config.teacher.name={report['arch']} "
        f"--config.teacher.checkpoint={_OUT.value}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a mistake (a missing --out, no checkpoint path) is one `error:` line and
  exit status 2."""
  return cli.parse_flags(flags.FLAGS, argv, num_args=1, usage=(
      "give exactly one PyTorch checkpoint path, e.g. python -m jaxkd.import_teacher "
      "--arch resnet8x4 --out t.msgpack ckpt.pth"))


if __name__ == "__main__":
  cli.quiet_environment(sys.argv)
  app.run(main, flags_parser=parse_flags)
