"""MLKD's strong augmentation: a RandAugment of two random PIL ops, then a Cutout.

As Jin-Ying/Multi-Level-Logit-Distillation @ 5ee473f applies it to the strong view
(mdistiller/dataset/cifar100.py and imagenet.py, `RandAugment(2, 10)` after the crop and the
flip; the FixMatch variant). On one uint8 image:

  1. two ops drawn uniformly, with replacement, from the 14 of OPS (`random.choices(k=2)`);
  2. each op applied in turn with a value v ~ U(low, high) of its own range (the magnitude
     argument 10 is unused: every op draws its value from its whole range);
  3. Cutout: v ~ U(0, 0.5), side s = v · W (none when v = 0); its corner
     x0 = int(max(0, c_x − s/2)), y0 = int(max(0, c_y − s/2)) from c_x = W + (1 − W) · u,
     c_y = H + (1 − H) · u', i.e. U(1, W] and U(1, H] — the reference calls
     `np.random.uniform(w)`, which sets low = W and high = 1, not U(0, W); the square
     (x0, y0, min(W, x0 + s), min(H, y0 + s)) is drawn by PIL (edges included) in the colour
     (125, 123, 114).

The ops are PIL's, called as the reference calls them: geometric ones with PIL's defaults
(nearest neighbour, black fill, rotation about the centre without expanding); Brightness,
Color, Contrast and Sharpness only weaken (factors in [0.05, 0.95)); Posterize keeps int(v) ∈
{4, ..., 7} bits; Solarize inverts the pixels ≥ v ∈ [0, 256); translations move by v · the
side. Images with one channel are PIL 'L' images (the reference only sees RGB; its Cutout
colour becomes PIL's grey of it, 123). Every draw comes from the NumPy Generator given, so the
view is a pure function of the example's key (jaxkd.data.keys).
"""

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

NUM_OPS = 2
CUTOUT_MAX = 0.5
CUTOUT_FILL = (125, 123, 114)


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, coefficients)


# (name, op(img, v), low, high): the reference's `augment_list()`, in its order.
OPS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    ("AutoContrast", lambda img, v: ImageOps.autocontrast(img), 0.0, 1.0),
    ("Brightness", lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    ("Color", lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    ("Contrast", lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    ("Equalize", lambda img, v: ImageOps.equalize(img), 0.0, 1.0),
    ("Identity", lambda img, v: img, 0.0, 1.0),
    ("Posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4.0, 8.0),
    ("Rotate", lambda img, v: img.rotate(v), -30.0, 30.0),
    ("Sharpness", lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    ("ShearX", lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("ShearY", lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0.0, 256.0),
    ("TranslateX", lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    ("TranslateY", lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
)
OP_NAMES = tuple(name for name, _, _, _ in OPS)


def to_pil(pixels: np.ndarray) -> Image.Image:
  """uint8 [H, W, 1] or [H, W, 3] -> a PIL 'L' or 'RGB' image."""
  if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
    raise ValueError(f"RandAugment takes [H, W, 1] or [H, W, 3] images, got {pixels.shape}")
  return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1
                                              else pixels), "L" if pixels.shape[-1] == 1
                         else "RGB")


def from_pil(img: Image.Image) -> np.ndarray:
  """A PIL 'L' or 'RGB' image -> uint8 [H, W, C]."""
  pixels = np.asarray(img, np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def cutout_fill(mode: str) -> int | tuple[int, int, int]:
  """The Cutout colour in `mode` ('RGB': the reference's; 'L': PIL's grey of it)."""
  return CUTOUT_FILL if mode == "RGB" else Image.new("RGB", (1, 1), CUTOUT_FILL).convert(
      mode).getpixel((0, 0))


def cutout(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  """The reference's `Cutout(img, U(0, 0.5))` (see the module docstring)."""
  v = rng.random() * CUTOUT_MAX
  if v <= 0.0:
    return img
  side = v * img.size[0]
  w, h = img.size
  x0 = w + (1.0 - w) * rng.random()
  y0 = h + (1.0 - h) * rng.random()
  x0 = int(max(0, x0 - side / 2.0))
  y0 = int(max(0, y0 - side / 2.0))
  box = (x0, y0, min(w, x0 + side), min(h, y0 + side))
  img = img.copy()
  ImageDraw.Draw(img).rectangle(box, cutout_fill(img.mode))
  return img


def rand_augment_pil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  """NUM_OPS random ops with random values, then Cutout, on a PIL image."""
  for index in rng.integers(0, len(OPS), size=NUM_OPS):
    _, op, low, high = OPS[int(index)]
    img = op(img, low + float(high - low) * rng.random())
  return cutout(img, rng)


def rand_augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The strong augmentation of one uint8 image [H, W, C] (C = 1 or 3), uint8 out."""
  return from_pil(rand_augment_pil(to_pil(np.asarray(pixels, np.uint8)), rng))
