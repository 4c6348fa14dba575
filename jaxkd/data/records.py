"""Random-access examples: `source[i]` is example i of a split as (image, label).

The image is uint8 [H, W, C] (decoded, resized to the dataset's `image_size` when set), or the
still-encoded bytes for datasets whose views decode it themselves (ImageNet's JPEGs). Nothing
is read before it is asked for, so a process holds only the examples in flight:
  TfdsSource   a tfds split read by index from its ArrayRecord files (`tfds.data_source`);
  FolderSource image files `<dir>/<split>/<class>/*`, in the order tfds' ImageFolder lists them;
  Head         the first n examples of another source;
  InMemory     a small split decoded once into two arrays (faster per example, see
               jaxkd.data.pipeline).
Every source pickles, so input workers in other processes read with it. This module does not
import TensorFlow.
"""

import dataclasses
import io
from typing import Any, Iterator, Protocol, Sequence, Union

import numpy as np
from etils import epath
from PIL import Image

Image_ = Union[np.ndarray, bytes]


class Source(Protocol):
  """What the pipeline reads: len() examples, each (image, label) by index."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[Image_, int]:
    ...


def examples(source: Source) -> Iterator[tuple[Image_, int]]:
  """Every example of `source`, in order."""
  for index in range(len(source)):
    yield source[index]


def labels(source: Source) -> np.ndarray:
  """int32 [len(source)]: every label (a source may read them without decoding images)."""
  read = getattr(source, 'labels', None)
  if read is not None:
    return read()
  return np.array([label for _, label in examples(source)], np.int32).reshape(-1)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, C] -> uint8 [size, size, C]: the shorter side scaled to `size` (PIL's
  bilinear, antialiased), then the central size × size square (torchvision's Resize +
  CenterCrop)."""
  image = np.asarray(image)
  h, w, c = image.shape
  scale = size / min(h, w)
  height, width = max(int(h * scale), size), max(int(w * scale), size)
  if (height, width) != (h, w):
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    image = np.asarray(pil.resize((width, height), Image.BILINEAR)).reshape(height, width, c)
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def decode(data: bytes, channels: int) -> np.ndarray:
  """An encoded image (PNG, JPEG, ...) as uint8 [H, W, channels]: grey for 1, else RGB (a grey
  file repeats its channel, an alpha channel is dropped)."""
  with Image.open(io.BytesIO(data)) as image:
    mode = 'L' if channels == 1 else 'RGB'
    pixels = np.asarray(image if image.mode == mode else image.convert(mode))
  return pixels.reshape(pixels.shape[:2] + (channels,))


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A tfds split read by index (tfds's ArrayRecord data source, whose items are feature dicts).

  `image_size` > 0 resizes every image (`resize`); `records` leave the image encoded when they
  were opened so (ImageNet).
  """
  records: Sequence[dict[str, Any]]
  image_size: int = 0

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> tuple[Image_, int]:
    return self._example(self.records[int(index)])

  def _example(self, record: dict[str, Any]) -> tuple[Image_, int]:
    image = record['image']
    if self.image_size and isinstance(image, np.ndarray):
      image = resize(image, self.image_size)
    return image, int(record['label'])

  def labels(self) -> np.ndarray:
    """Every label, read in chunks (tfds reads a chunk's records in parallel)."""
    out = np.empty(len(self), np.int32)
    chunk = 1024
    for start in range(0, len(self), chunk):
      indices = list(range(start, min(start + chunk, len(self))))
      records = (self.records.__getitems__(indices) if hasattr(self.records, '__getitems__')
                 else [self.records[i] for i in indices])
      out[start:start + len(indices)] = [int(record['label']) for record in records]
    return out


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """Image files with their labels, decoded (and resized) when read; any path etils reads
  (local, gs://)."""
  paths: tuple[str, ...]
  label_of: np.ndarray  # int32 [len(paths)]
  channels: int
  image_size: int = 0

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    index = int(index)
    image = decode(epath.Path(self.paths[index]).read_bytes(), self.channels)
    if self.image_size:
      image = resize(image, self.image_size)
    return image, int(self.label_of[index])

  def labels(self) -> np.ndarray:
    return np.asarray(self.label_of, np.int32)


@dataclasses.dataclass(frozen=True)
class Head:
  """The first `size` examples of `source`."""
  source: Source
  size: int

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> tuple[Image_, int]:
    if not 0 <= index < self.size:
      raise IndexError(f'example {index} of {self.size}')
    return self.source[index]

  def labels(self) -> np.ndarray:
    return labels(self.source)[:self.size]


@dataclasses.dataclass(frozen=True)
class InMemory:
  """A split decoded once: uint8 images [N, H, W, C] and int32 labels [N]."""
  images: np.ndarray
  label_of: np.ndarray

  @classmethod
  def read(cls, source: Source) -> 'InMemory':
    """Reads every example of `source` (decoded images of one shape)."""
    images, label_of = None, np.empty(len(source), np.int32)
    for index, (image, label) in enumerate(examples(source)):
      if images is None:
        images = np.empty((len(source),) + np.shape(image), np.uint8)
      images[index], label_of[index] = image, label
    return cls(images, label_of)

  def __len__(self) -> int:
    return len(self.label_of)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.label_of[index])

  def labels(self) -> np.ndarray:
    return self.label_of
