"""Prints the model zoo as a markdown table: parameters and MACs per image, next to PyTorch's.

    python experiments/zoo_table.py                 # the table
    python experiments/zoo_table.py --xla           # plus XLA's own estimate (slower)
    python experiments/zoo_table.py --readme README.md   # rewrite the table inside README.md

MACs are counted the way KD papers (and HSAKD's `cal_multi_adds`) count "FLOPs": the
multiply-accumulates of convolutions and linear layers only, for one image,
  conv:   H_out * W_out * C_out * (C_in / groups) * kh * kw,      linear: in * out,
read from the shapes every `nn.Conv` / `Linear` sees while the network is traced abstractly
(nothing is computed). `--xla` adds XLA's cost analysis of the lowered forward pass (flops / 2)
as a cross-check: it also counts BatchNorm, activations, pooling and additions, but skips the
products with a convolution's zero padding, so it can land on either side.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxkd.models import MODEL_NAMES, get_model, layers  # noqa: E402

START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"

# Parameters and MACs (millions) per image of the reference PyTorch networks (RepDistiller @
# b84f547 and HSAKD @ 28c8dc2 `models/`, torchvision, mdistiller's MobileNetV1), counted with
# forward hooks by the same rule, at 32x32 with 100 classes and at 224x224 with 1000 classes
# (the ImageNet figures rounded to 1e-3 G).
REFERENCE = {
    "resnet8": (83_892, 12.51), "resnet14": (181_108, 26.66), "resnet20": (278_324, 40.82),
    "resnet32": (472_756, 69.13), "resnet44": (667_188, 97.44), "resnet56": (861_620, 125.75),
    "resnet110": (1_736_564, 253.16), "resnet8x4": (1_233_540, 177.07),
    "resnet32x4": (7_433_860, 1083.04), "wrn_16_1": (180_916, 26.66),
    "wrn_16_2": (703_284, 101.12), "wrn_40_1": (569_780, 83.29), "wrn_40_2": (2_255_156, 327.61),
    "vgg8": (3_965_028, 96.19), "vgg11": (9_277_284, 209.44), "vgg13": (9_462_180, 284.94),
    "vgg16": (14_774_436, 398.18), "vgg19": (20_086_692, 511.43),
    "MobileNetV2": (812_836, 6.52), "MobileNetV2_stride1": (812_836, 25.71),
    "ShuffleV1": (949_258, 38.69), "ShuffleV2": (1_355_528, 44.50),
    "ResNet50": (23_705_252, 1298.01),
    "resnet18_imagenet": (11_689_512, 1814.0), "resnet34_imagenet": (21_797_672, 3664.0),
    "resnet50_imagenet": (25_557_032, 4089.0), "mobilenetv1_imagenet": (4_231_976, 569.0),
}


def input_shape(name: str) -> tuple[int, int, int, int]:
  side = 224 if name.endswith("_imagenet") else 32
  return (1, side, side, 3)


def num_classes(name: str) -> int:
  return 1000 if name.endswith("_imagenet") else 100


def count_macs(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
  """(all, depthwise) conv + linear multiply-accumulates per image (see the module docstring)."""
  counts = {"all": 0, "depthwise": 0}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
      return out
    if isinstance(module, nn.Conv):
      c_in = args[0].shape[-1]
      groups = module.feature_group_count
      macs = math.prod(out.shape[1:]) * (c_in // groups) * math.prod(module.kernel_size)
      counts["all"] += macs
      if groups > 1 and groups == c_in:
        counts["depthwise"] += macs
    elif isinstance(module, layers.Linear):
      counts["all"] += math.prod(out.shape[1:]) * args[0].shape[-1]
    return out

  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.apply, variables, x)
  return counts["all"], counts["depthwise"]  # out.shape[1:] made them per image already


def count_params(model: nn.Module, shape: tuple[int, ...]) -> int:
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct(shape, jnp.float32))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables["params"])))


def xla_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
  """XLA's flops / 2 for one eval-mode forward pass (all ops, not only conv / linear)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  lowered = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / 2 / shape[0]


def table(names, with_xla: bool = False) -> str:
  head = ["model", "input", "params", "MACs (M)", "of which depthwise (M)", "PyTorch MACs (M)"]
  if with_xla:
    head.append("XLA flops/2 (M)")
  rows = [head, ["---", "---"] + ["---:"] * (len(head) - 2)]
  for name in names:
    shape = input_shape(name)
    model = get_model(name, num_classes(name))
    macs, depthwise = count_macs(model, shape)
    params = count_params(model, shape)
    ref_params, ref_macs = REFERENCE.get(name, (None, None))
    if ref_params is not None and ref_params != params:
      raise SystemExit(f"{name}: {params} parameters, the PyTorch network has {ref_params}")
    row = [f"`{name}`", f"{shape[1]}x{shape[2]}, {num_classes(name)} classes", f"{params:,}",
           f"{macs / 1e6:.2f}", f"{depthwise / 1e6:.2f}",
           "" if ref_macs is None else f"{ref_macs:.2f}"]
    if with_xla:
      row.append(f"{xla_macs(model, shape) / 1e6:.2f}")
    rows.append(row)
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


_README_NOTES = """\
Parameters and multiply-accumulates per image of conv and linear layers (the papers' "FLOPs"),
counted by `experiments/zoo_table.py` from the shapes each layer sees, next to the figures of the
reference PyTorch code; CIFAR nets at 32x32 with 100 classes, ImageNet nets at 224x224 with 1000.
CIFAR names are RepDistiller's `model_dict` keys (the ImageNet nets end in `_imagenet`);
`MobileNetV2` is RepDistiller's `mobile_half` (stride-2 stem), `MobileNetV2_stride1` HSAKD's
variant (stride-1 stem, the network behind HSAKD's MobileNetV2 numbers). Each family's module
docstring lists its feature taps; `docs/zoo.md` has the families, their taps and sizes, and
`docs/weights.md` how PyTorch weights map onto them.

A PyTorch teacher (`.pth` / `.pth.tar` from RepDistiller / CRD / mdistiller `{'model'}`, SSKD
`{'state_dict'}`, HSAKD `{'net'}`, with or without `module.` / `backbone.` prefixes) becomes a
jaxkd teacher file without PyTorch installed; the reader only rebuilds tensors and refuses any
pickle that names other Python objects, so nothing in the file is ever executed:

```
python -m jaxkd.import_teacher --arch resnet32x4 --num_classes 100 \\
    --out teachers/resnet32x4.msgpack save/models/resnet32x4_vanilla/ckpt_epoch_240.pth
python -m jaxkd.main --config configs/default.py --workdir runs/r32x4_r8x4 \\
    --config.teacher.name=resnet32x4 --config.teacher.checkpoint=teachers/resnet32x4.msgpack
```

A checkpoint that does not fit `--arch` is refused with the first missing, unexpected or
misshapen entry named by its PyTorch key. Check the imported teacher's accuracy before distilling
from it (top-1 and top-5 in percent on the dataset's eval split, counted as the trainer's
evaluations count them; any `--config.dataset.*`, `eval_batch_size` or `half_precision` override
works; no recipe file is needed):

```
python -m jaxkd.evaluate --model resnet32x4 --checkpoint teachers/resnet32x4.msgpack \\
    --config.dataset.name=cifar100 --config.dataset.data_dir=DIR
```

It reads any jaxkd variables file of a zoo network (a trained `<workdir>/teacher/teacher.msgpack`,
a KD or CE student's `student.msgpack`; not a student exported with a method's heads, such as
SSKD's).
"""


def readme_block(names) -> str:
  """What goes between the README markers: the table, then how to import a PyTorch teacher."""
  return f"{table(names)}\n\n{_README_NOTES}".rstrip()


def replace_between_markers(text: str, content: str) -> str:
  """`text` with everything between the zoo-table markers replaced by `content`."""
  if START not in text or END not in text or text.index(START) > text.index(END):
    raise SystemExit(f"the README has no {START} ... {END} section")
  before, rest = text.split(START, 1)
  _, after = rest.split(END, 1)
  return f"{before}{START}\n{content}\n{END}{after}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--xla", action="store_true", help="add XLA's flops/2 column")
  parser.add_argument("--readme", default="",
                      help="rewrite the zoo section (table and import example) of this README")
  parser.add_argument("models", nargs="*", default=list(MODEL_NAMES))
  args = parser.parse_args()
  text = table(args.models, args.xla)
  if args.readme:
    with open(args.readme) as f:
      readme = f.read()
    with open(args.readme, "w") as f:
      f.write(replace_between_markers(readme, readme_block(args.models)))
  print(text)


if __name__ == "__main__":
  main()
