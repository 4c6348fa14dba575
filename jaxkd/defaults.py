"""Config defaults the package itself needs: `jaxkd.evaluate` runs without a recipe file, and
every recipe starts its `config.dataset` from here. Kept free of TensorFlow, so importing a
recipe stays light."""

import ml_collections
from ml_collections.config_dict import placeholder


def default_flip(name: str) -> bool:
  """Whether dataset `name` flips its training images where `dataset.flip` is None: the
  registry's datasets and `tfds:` sources do, except the digits (a mirrored digit is another
  digit, or none); `folder:` sources do not (digits, text or medical images change meaning when
  mirrored). The registry (jaxkd.data.sources) holds the same values."""
  return not (name == "digits" or name.startswith("folder:"))


def dataset_config(name: str = "cifar100") -> ml_collections.ConfigDict:
  """`config.dataset` of every recipe (and of `jaxkd.evaluate`), with its defaults."""
  return ml_collections.ConfigDict(dict(
      name=name,                # registry name (digits, cifar10, cifar100, ...), tfds:<builder>
                                # or folder:<dir> (own data, see jaxkd.data.sources)
      data_dir="",              # tfds data_dir; "" = the tfds default (~/tensorflow_datasets)
      train_split="train",
      eval_split="test",
      num_train_examples=-1,    # -1: from the tfds metadata (set it for mock data)
      num_eval_examples=-1,
      train_fraction=1.0,       # < 1: a class-balanced subset per seed (few-shot experiments)
      label_noise=0.0,          # > 0: that fraction of train labels flipped to another class
      normalization="dataset",  # student's view statistics: dataset, or clip (EGA's students)
      # tfds:/folder: only: 0 = images as stored (all of one size); N > 0 = every image resized,
      # shorter side to N (bilinear, antialiased), then its central NxN square.
      image_size=0,
      # Per-channel mean/std of pixels in [0, 1], one value per channel; both () = the
      # registry's, or for tfds:/folder: computed from train_split once per workdir
      # (<workdir>/dataset_stats.json).
      mean=(),
      std=(),
      # Random horizontal flips in training: None = the dataset's own choice (the registry's:
      # yes, but not for digits; tfds: yes; folder: no, as digits, text or medical images
      # change meaning when mirrored); True / False to decide.
      flip=placeholder(bool),
  ))
