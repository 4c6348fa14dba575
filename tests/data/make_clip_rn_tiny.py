"""Writes clip_rn_tiny/: a tiny random CLIP ResNet as an OpenAI TorchScript archive + its outputs.

Not part of the test run (it needs PyTorch and a checkout of OpenAI's `clip` package). Run as

    python make_clip_rn_tiny.py /path/to/openai-CLIP [clip_rn_tiny]

with the reference at commit d05afc436d78f1c48dc0dbf8e5980a9d471f35f6 (its `clip/model.py` is
imported as it is, alone: the package's `__init__` wants torchvision for preprocessing).

The tower is a `ModifiedResNet` with layers (1, 2, 1, 1), width 4 (`build_model`'s head rule
then gives 4 · 32 / 64 = 2 heads over 128 channels; width 8 would double the archive past
1 MB), output_dim 16, at 64 px (a 2 x 2 map under the attention pool): layer1 projects its
shortcut without a stride, layer2 holds a strided block and a block with an identity shortcut.
It sits in a whole `CLIP` model with a one-block text tower, because that is what the released
`.pt` files hold.

Written, in clip_rn_tiny/:
  RN_tiny.pt    the model traced with `torch.jit.trace_module` (forward, encode_image,
                encode_text) and saved with `torch.jit.save`, its weights half precision where
                `clip.model.convert_weights` makes them so (conv, linear, projections) and
                float32 elsewhere (BatchNorm, embeddings), the split `clip.load` works with
  expected.npz  pixel_values_nchw [2, 3, 64, 64] (CLIP-normalised-like N(0, 1) pixels),
                image_embeds [2, 16] (`encode_image`), and the tower's intermediate maps
                stem_nchw (after the stem's average pool), stage1_nchw ... stage4_nchw
                (layer1 ... layer4 outputs), all computed in float32, eval mode, from the
                half-rounded weights the archive holds
BatchNorm scales and shifts are random (CLIP's own init zeroes every bn3 scale, which would
hide the residual branches) and the running statistics come from a few train-mode forwards,
so evaluation-mode normalisation is exercised with non-trivial statistics.
"""

import importlib.util
import os
import sys

import numpy as np
import torch

IMAGE_SIZE = 64
LAYERS = (1, 2, 1, 1)
WIDTH = 4
EMBED_DIM = 16
CONTEXT_LENGTH = 4
VOCAB_SIZE = 16
TEXT_WIDTH = 64  # build_model infers text heads as width / 64.
TEXT_LAYERS = 1


def main(reference_dir: str, out_dir: str) -> None:
  spec = importlib.util.spec_from_file_location(
      "clip_model", os.path.join(reference_dir, "clip", "model.py"))
  clip_model = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(clip_model)

  torch.manual_seed(0)
  model = clip_model.CLIP(EMBED_DIM, IMAGE_SIZE, LAYERS, WIDTH, None, CONTEXT_LENGTH,
                          VOCAB_SIZE, TEXT_WIDTH, TEXT_WIDTH // 64, TEXT_LAYERS)
  visual = model.visual
  bns = [m for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
      bn.momentum = None  # Cumulative averages over the calibration batches below.
  visual.train()
  with torch.no_grad():
    for _ in range(3):
      visual(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE) * 1.5 + 0.3)
  for bn in bns:
    bn.momentum = 0.1
  # Round the weights the release keeps in half precision, then compute in float32 from them.
  clip_model.convert_weights(model)
  half_names = {name for name, p in model.named_parameters() if p.dtype == torch.float16}
  model.float().eval()

  rng = np.random.RandomState(0)
  pixels = rng.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
  taps = {}
  hooks = [getattr(visual, f"layer{s}").register_forward_hook(
      lambda m, i, o, s=s: taps.__setitem__(f"stage{s}_nchw", o.detach().numpy().copy()))
           for s in range(1, 5)]
  hooks.append(visual.avgpool.register_forward_hook(
      lambda m, i, o: taps.__setitem__("stem_nchw", o.detach().numpy().copy())))
  with torch.no_grad():
    image = torch.from_numpy(pixels)
    image_embeds = model.encode_image(image).numpy()
  for h in hooks:
    h.remove()
  assert len(taps) == 5, sorted(taps)

  text = torch.randint(0, VOCAB_SIZE, (2, CONTEXT_LENGTH))
  with torch.no_grad():
    traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": image,
                                            "encode_text": text})
  for name, p in traced.named_parameters():
    if name in half_names:
      p.data = p.data.half()
  os.makedirs(out_dir, exist_ok=True)
  archive = os.path.join(out_dir, "RN_tiny.pt")
  torch.jit.save(traced, archive)

  # The archive must be what `clip.load(..., jit=False)` rebuilds into the same tower.
  rebuilt = clip_model.build_model(torch.jit.load(archive, map_location="cpu").state_dict())
  rebuilt = rebuilt.float().eval()
  assert rebuilt.visual.attnpool.num_heads == 2
  with torch.no_grad():
    again = rebuilt.encode_image(image).numpy()
  np.testing.assert_array_equal(again, image_embeds)

  np.savez(os.path.join(out_dir, "expected.npz"), pixel_values_nchw=pixels,
           image_embeds=image_embeds.astype(np.float32), **taps)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else
       os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_rn_tiny"))
