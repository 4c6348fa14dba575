"""Throughput of jaxkd's training input pipeline per views mode, beside the step that reads it
(`python experiments/benchmark.py --input`; see benchmark.py's docstring).

The datasets are mocks written as tfds would prepare the real ones (the registry's `cifar100` and
`imagenet2012`, ArrayRecord files in a data_dir), so the pipeline runs exactly as in training:
  cifar100      10,000 train images, 32 x 32 PNGs of smooth random colour plus noise;
  imagenet2012  256 train images, JPEGs (quality 90) of 500 x 375 and the other common ImageNet
                sizes, smooth random colour plus noise (about the size of ImageNet's JPEGs).
"""

import io
import json
import os
import tempfile
import time

import numpy as np

CIFAR_EXAMPLES = 10_000
IMAGENET_EXAMPLES = 256
IMAGENET_SIZES = ((375, 500), (333, 500), (500, 375), (500, 500), (281, 500))  # (H, W)
# (dataset, views, batch, the step reading them: method, teacher, student, image size, classes).
CASES = (
    ("cifar100", "none", 64, ("kd", "resnet32x4", "resnet8x4", 32, 100)),
    ("cifar100", "rotations", 64, ("sskd", "resnet32x4", "resnet8x4", 32, 100)),
    ("cifar100", "rotations_of_crop", 64, ("hsakd", "resnet32x4", "resnet8x4", 32, 100)),
    # SimCLR pretraining of the teacher network (EGA's stage `pretrain`) reads two crops.
    ("cifar100", "two_crops", 64, ("simclr", "resnet32x4", "resnet32x4", 32, 100)),
    ("imagenet2012", "none", 32,
     ("kd", "resnet34_imagenet", "resnet18_imagenet", 224, 1000)),
)
# Also read straight from the files, for the comparison with the in-memory path.
DIRECT = (("cifar100", "none"), ("cifar100", "rotations"))


def _smooth(rng: np.random.Generator, height: int, width: int, noise: float) -> np.ndarray:
  """uint8 [height, width, 3]: random colour blobs (a bicubic upsampling) plus Gaussian noise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), np.uint8)
  image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _cifar_examples(split: str):
  rng = np.random.default_rng(0 if split == "train" else 1)
  for i in range(CIFAR_EXAMPLES if split == "train" else 1000):
    yield i, {"id": f"{split}_{i}", "image": _smooth(rng, 32, 32, 12.0),
              "label": int(rng.integers(100)), "coarse_label": int(rng.integers(20))}


def _imagenet_examples(split: str):
  rng = np.random.default_rng(2 if split == "train" else 3)
  for i in range(IMAGENET_EXAMPLES if split == "train" else 64):
    height, width = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
    yield i, {"image": _jpeg(_smooth(rng, height, width, 10.0)),
              "label": int(rng.integers(1000)), "file_name": f"{split}_{i}.JPEG"}


def write_mock(name: str, data_dir: str) -> None:
  """Prepares `name` (cifar100 or imagenet2012) in data_dir from the mock examples, with tfds's
  own builder of that dataset (so its features and metadata are the real ones)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base = tfds.builder_cls(name)
  examples = {"cifar100": _cifar_examples, "imagenet2012": _imagenet_examples}[name]

  class Mock(base, skip_registration=True):  # pylint: disable=missing-class-docstring
    def _split_generators(self, dl_manager):
      del dl_manager
      validation = "test" if name == "cifar100" else "validation"
      return {"train": examples("train"), validation: examples(validation)}

  Mock.name = name
  builder = Mock(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _dataset_config(name: str, data_dir: str):
  from jaxkd import defaults  # pylint: disable=g-import-not-at-top
  config = defaults.dataset_config(name)
  config.data_dir = data_dir
  if name == "imagenet2012":
    config.eval_split = "validation"
  return config


def measure(batch_fn, batch: int, seconds: float, num_workers: int) -> dict:
  """Images/s of `batch_fn` run by jaxkd's grain iterator, after one warm-up batch: per wall
  second, and per CPU-second of this process (its threads; workers excluded). At least one
  batch is timed, however long it takes on a loaded machine."""
  from jaxkd.data import stream  # pylint: disable=g-import-not-at-top
  batches = stream.batches(batch_fn, 0, 1 << 62, num_workers=num_workers, num_threads=1)
  next(batches)
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while count == 0 or time.perf_counter() - start < seconds:
    next(batches)
    count += 1
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return {"images_per_s": count * batch / wall,
          "images_per_cpu_s": count * batch / max(cpu, 1e-9), "batches": count}


def input_record(dataset: str, views: str, batch: int, data_dir: str, seconds: float,
                 in_memory: bool = True) -> dict:
  """The pipeline's images/s on one core (one thread of this process: images per CPU-second)
  and on every core (one input worker per core: wall)."""
  from jaxkd.data import pipeline  # pylint: disable=g-import-not-at-top
  limit = pipeline.IN_MEMORY_BYTES
  pipeline.IN_MEMORY_BYTES = limit if in_memory else 0
  try:
    batch_fn = pipeline.train_batch_fn(_dataset_config(dataset, data_dir), views, batch, seed=0)
  finally:
    pipeline.IN_MEMORY_BYTES = limit
  from jaxkd.data import records  # pylint: disable=g-import-not-at-top
  record = {"dataset": dataset, "views": views, "batch": batch,
            "in_memory": isinstance(batch_fn.source, records.InMemory)}
  one = measure(batch_fn, batch, seconds, num_workers=0)
  record.update(one_core_images_per_s=one["images_per_cpu_s"],
                one_core_wall_images_per_s=one["images_per_s"])
  if in_memory:
    workers = os.cpu_count() or 1
    every = measure(batch_fn, batch, seconds, num_workers=workers)
    record.update(all_cores_images_per_s=every["images_per_s"], workers=workers)
  return record


def run(seconds: float, data_dir: str, out: str, bench_one, machine_description) -> None:
  """Every case of CASES (and DIRECT), printed as a table and written to `out` as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")  # as jaxkd.main
  data_dir = data_dir or tempfile.mkdtemp(prefix="jaxkd_input_")
  for name in ("cifar100", "imagenet2012"):
    write_mock(name, data_dir)
  machine = machine_description()
  print(f"{machine['processor']} ({machine['cpu_count']} cores); load average "
        f"{machine['load_average_at_start'][0]:.2f}; mock datasets in {data_dir}", flush=True)
  results = []
  for dataset, views, batch, (method, teacher, student, size, classes) in CASES:
    record = input_record(dataset, views, batch, data_dir, seconds)
    step = bench_one(method, teacher, student, batch, size, classes, jnp.float32, jnp.float32,
                     3, False)
    record.update(step=f"{method} {teacher} -> {student}",
                  step_images_per_s=step["images_per_s"])
    record["one_core_ratio"] = record["one_core_images_per_s"] / record["step_images_per_s"]
    record["all_cores_ratio"] = record["all_cores_images_per_s"] / record["step_images_per_s"]
    results.append(record)
    print(_row(record), flush=True)
  for dataset, views in DIRECT:
    record = input_record(dataset, views, 64, data_dir, seconds, in_memory=False)
    results.append(record)
    print(_row(record), flush=True)
  machine["load_average_at_end"] = os.getloadavg()
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {out}")


def _row(r: dict) -> str:
  text = (f"{r['dataset']} {r['views']} (batch {r['batch']}, in memory: "
          f"{'yes' if r['in_memory'] else 'no'}) | one core {r['one_core_images_per_s']:.0f} "
          f"img/s per CPU-s ({r['one_core_wall_images_per_s']:.0f} wall)")
  if "all_cores_images_per_s" in r:
    text += f"  all cores ({r['workers']} workers) {r['all_cores_images_per_s']:.0f} img/s"
  if "step_images_per_s" in r:
    text += (f"  | step {r['step']} {r['step_images_per_s']:.1f} img/s: one core "
             f"{r['one_core_ratio']:.1f}x, all cores {r['all_cores_ratio']:.1f}x")
  return text
