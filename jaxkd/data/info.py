"""What the pipeline, the models and the metrics need to know about a dataset (no TensorFlow, so
that input workers stay light)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline, the models and the metrics need to know about a dataset."""
  name: str  # Config name, e.g. 'cifar100'.
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_train: int  # Training examples used, after `train_fraction` (0 in the registry).
  num_eval: int
  mean: tuple[float, ...]  # Per channel, on images scaled to [0, 1].
  std: tuple[float, ...]
  crop_padding: int  # Zero padding of the random crop back to image_shape.
  flip: bool  # Random horizontal flips in training.
  # How an example becomes views: 'pad_crop', the recipe of jaxkd/data/views.py (zero-pad, crop,
  # flip) on decoded images; 'inception_crop', jaxkd/data/imagenet.py (random-resized crop or
  # resize + center crop) on the still-encoded JPEG, which the data source then leaves encoded.
  transform: str = 'pad_crop'
