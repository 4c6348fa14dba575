"""Importing PyTorch teachers: the safe reader, the layouts, misfits, the CLI and a run with it;
and the way back, a network exported to a PyTorch state_dict (`jaxkd.export_student`).

The files in tests/data/torch_checkpoints hold the weights of golden_resnet8x4.npz in the layouts
users have: RepDistiller/CRD `{'model': state_dict}`, SSKD `{'state_dict': ...}`, HSAKD
`{'net': ...}` and a DataParallel `module.` prefix (`LAYOUTS`); `malicious.pth` runs
`touch /tmp/jaxkd_unsafe_unpickle_ran` when unpickled without restriction. Files in other
variants (the legacy format, wrapper prefixes, strided tensors) are written here by `_torch_save`,
a minimal re-implementation of torch.save's two layouts, since PyTorch is not installed.
"""

import collections
import functools
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers

from configs import demo
from jaxkd import checkpoint
from jaxkd import export_student
from jaxkd import import_teacher
from jaxkd import train
from jaxkd.errors import UserError
from jaxkd.interop import torch_checkpoint
from jaxkd.interop.torch_layout import torch_to_flax
from jaxkd.models import get_model

DATA = pathlib.Path(__file__).parent / "data"
CKPTS = DATA / "torch_checkpoints"
REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = "/tmp/jaxkd_unsafe_unpickle_ran"
LAYOUTS = {  # file -> prefixes the importer removes
    "resnet8x4_repdistiller_format.pth": [],
    "resnet8x4_sskd_format.pth": [],
    "resnet8x4_hsakd_format.pth.tar": [],
    "resnet8x4_dataparallel_prefix.pth": ["module."],
}


@pytest.fixture(scope="module")
def golden():
  with np.load(DATA / "golden_resnet8x4.npz") as npz:
    data = {k: npz[k] for k in npz.files}
  state_dict = {k: data[k] for k in json.loads(str(data["meta"]))["state_keys"]}
  return data, state_dict


@functools.lru_cache(maxsize=None)
def _logits_fn():
  model = get_model("resnet8x4", 100)
  return jax.jit(lambda v, x: model.apply(v, x)[0])


def _logits(variables, images_nchw):
  backbone = {c: tree["backbone"] for c, tree in variables.items()}
  with jax.default_matmul_precision("highest"):
    return np.asarray(_logits_fn()(backbone, np.transpose(images_nchw, (0, 2, 3, 1))))


# --- the golden files ----------------------------------------------------------------------------


def test_every_shipped_file_is_covered():
  assert sorted(os.listdir(CKPTS)) == sorted(list(LAYOUTS) + ["malicious.pth"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_give_the_golden_logits(golden, name):
  data, state_dict = golden
  variables, report = import_teacher.convert(str(CKPTS / name), "resnet8x4", 100)
  assert report["prefixes_removed"] == LAYOUTS[name]
  assert report["params"] == 1_233_540
  want = torch_to_flax(state_dict)
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[collection]["backbone"],
                 want[collection])
  logits = _logits(variables, data["input"])
  np.testing.assert_allclose(logits, data["logits"], atol=1e-4, rtol=1e-4)
  assert list(np.argmax(logits, -1)) == [68, 67]


def test_loaded_checkpoint_keeps_its_other_entries():
  ckpt = torch_checkpoint.load(str(CKPTS / "resnet8x4_hsakd_format.pth.tar"))
  assert ckpt["acc"] == 73.1 and ckpt["epoch"] == 240
  assert ckpt["optimizer"] == {"state": {}, "param_groups": [{"lr": 0.05}]}
  assert ckpt["net"]["layer1.0.bn1.num_batches_tracked"].dtype == np.int64


def test_malicious_checkpoint_is_refused_and_runs_nothing():
  if os.path.exists(MARKER):
    os.remove(MARKER)
  for call in (lambda: torch_checkpoint.load(str(CKPTS / "malicious.pth")),
               lambda: import_teacher.convert(str(CKPTS / "malicious.pth"), "resnet8x4", 100)):
    with pytest.raises(UserError, match=r"refusing to load .*malicious.pth.*posix\.system"):
      call()
  assert not os.path.exists(MARKER)


# --- files written here: legacy format, wrappers, strides ----------------------------------------


class _Storage:
  def __init__(self, array: np.ndarray, key: str):
    self.array, self.key = np.ascontiguousarray(array).reshape(-1), key


class _Tensor:
  """Pickles like a torch tensor: torch._utils._rebuild_tensor_v2(storage, offset, size, stride)."""

  def __init__(self, storage, offset, size, stride, rebuild):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
    self.rebuild = rebuild

  def __reduce__(self):
    return self.rebuild, self.args


class _Evil:
  def __reduce__(self):
    return os.system, (f"touch {MARKER}",)


_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("int64"): "LongStorage"}


def _torch_save(obj_fn, path, legacy=False):
  """Writes what torch.save(obj) would, for an object of dicts, strings, numbers and tensors.

  `obj_fn(tensor)` builds the object; `tensor(array)` or `tensor(storage, offset, size, stride)`
  stands for a torch tensor. Stand-in `torch` / `torch._utils` modules exist only while pickling,
  so the pickle names the same globals as PyTorch's (torch.FloatStorage, ...).
  """
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")
  storage_classes = {}
  for name in _STORAGE_NAMES.values():
    storage_classes[name] = type(name, (), {"__module__": "torch"})
    setattr(torch_mod, name, storage_classes[name])

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod._utils = utils_mod
  storages: dict[str, _Storage] = {}

  def tensor(array_or_storage, offset=0, size=None, stride=None):
    if isinstance(array_or_storage, _Storage):
      return _Tensor(array_or_storage, offset, size, stride, _rebuild_tensor_v2)
    a = np.asarray(array_or_storage)
    storage = _Storage(a, str(len(storages)))
    storages[storage.key] = storage
    strides = tuple(s // a.itemsize for s in np.require(a, requirements="C").strides)
    return _Tensor(storage, 0, a.shape, strides, _rebuild_tensor_v2)

  def new_storage(array):
    storage = _Storage(np.asarray(array), str(len(storages)))
    storages[storage.key] = storage
    return storage

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        cls = storage_classes[_STORAGE_NAMES[obj.array.dtype]]
        pid = ("storage", cls, obj.key, "cpu", obj.array.size)
        return pid + (None,) if legacy else pid
      return None

  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
  try:
    buf = io.BytesIO()
    if legacy:
      for header in (0x1950A86A20F9469CFC6C, 1001,
                     dict(protocol_version=1001, little_endian=True,
                          type_sizes=dict(short=2, int=4, long=8))):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(obj_fn(tensor, new_storage))
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  if legacy:
    keys = sorted(storages)
    pickle.dump(keys, buf, protocol=2)
    for key in keys:
      a = storages[key].array
      buf.write(struct.pack("<q", a.size) + a.astype(a.dtype.newbyteorder("<")).tobytes())
    pathlib.Path(path).write_bytes(buf.getvalue())
  else:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
      z.writestr("archive/data.pkl", buf.getvalue())
      z.writestr("archive/byteorder", "little")
      for key, storage in storages.items():
        z.writestr(f"archive/data/{key}", storage.array.astype("<" + storage.array.dtype.str[1:])
                   .tobytes())
      z.writestr("archive/version", "3\n")


def test_legacy_format_float64_is_read_and_cast_to_float32(golden, tmp_path):
  data, state_dict = golden
  path = tmp_path / "legacy.pth"
  _torch_save(lambda t, s: {"epoch": 240, "model": collections.OrderedDict(
      (k, t(v.astype(np.float64) if v.dtype == np.float32 else v))
      for k, v in state_dict.items())}, path, legacy=True)
  variables, _ = import_teacher.convert(str(path), "resnet8x4", 100)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["backbone"],
               torch_to_flax(state_dict)["params"])


def test_legacy_format_refuses_globals(tmp_path):
  if os.path.exists(MARKER):
    os.remove(MARKER)
  path = tmp_path / "evil_legacy.pth"
  _torch_save(lambda t, s: {"model": {"fc.bias": t(np.zeros(3, np.float32))}, "x": _Evil()},
              path, legacy=True)
  with pytest.raises(UserError, match=r"posix\.system"):
    torch_checkpoint.load(str(path))
  assert not os.path.exists(MARKER)


@pytest.mark.parametrize("legacy", [False, True])
def test_views_share_storage_with_offsets_and_strides(tmp_path, legacy):
  base = np.arange(12, dtype=np.float32)

  def obj(t, new_storage):
    storage = new_storage(base)
    return {"matrix": t(storage, 0, (3, 4), (4, 1)),
            "transposed": t(storage, 0, (4, 3), (1, 4)),
            "tail": t(storage, 5, (2, 2), (2, 1)),
            "empty": t(storage, 0, (0, 4), (4, 1))}

  path = tmp_path / "views.pth"
  _torch_save(obj, path, legacy=legacy)
  got = torch_checkpoint.load(str(path))
  np.testing.assert_array_equal(got["matrix"], base.reshape(3, 4))
  np.testing.assert_array_equal(got["transposed"], base.reshape(3, 4).T)
  np.testing.assert_array_equal(got["tail"], base[5:9].reshape(2, 2))
  assert got["empty"].shape == (0, 4)


def test_tensor_past_its_storage_is_refused(tmp_path):
  path = tmp_path / "bad.pth"
  _torch_save(lambda t, s: {"w": t(s(np.zeros(4, np.float32)), 2, (2, 2), (2, 1))}, path)
  with pytest.raises(UserError, match="past the end"):
    torch_checkpoint.load(str(path))


def test_wrapper_prefixes_and_their_heads_are_dropped(golden, tmp_path):
  data, state_dict = golden
  path = tmp_path / "hsakd_aux.pth.tar"
  aux = {"auxiliary_classifier.fc1.weight": np.zeros((400, 64), np.float32)}
  _torch_save(lambda t, s: {"net": {
      **{f"module.backbone.{k}": t(v) for k, v in state_dict.items()},
      **{f"module.{k}": t(v) for k, v in aux.items()}}, "acc": 80.0}, path)
  variables, report = import_teacher.convert(str(path), "resnet8x4", 100)
  assert report["prefixes_removed"] == ["module.", "backbone."]
  np.testing.assert_allclose(_logits(variables, data["input"]), data["logits"], atol=1e-4)
  # An explicit prefix wins over the guess.
  with pytest.raises(UserError, match="lacks 'conv1.weight'"):
    import_teacher.convert(str(path), "resnet8x4", 100, prefix="")


def test_mobilenetv2_head_of_sskd_and_hsakd_maps_onto_repdistillers_name(tmp_path):
  expected = import_teacher.template("MobileNetV2", 100)
  shapes = import_teacher._torch_view(expected)
  assert "classifier.0.weight" in shapes
  rng = np.random.RandomState(0)
  sd = {k.replace("classifier.0.", "classifier."): rng.randn(*s).astype(np.float32)
        for k, s in shapes.items()}
  path = tmp_path / "mbv2_sskd.pth"
  _torch_save(lambda t, s: {"state_dict": {k: t(v) for k, v in sd.items()}}, path)
  variables, _ = import_teacher.convert(str(path), "MobileNetV2", 100)
  np.testing.assert_array_equal(variables["params"]["backbone"]["classifier_0"]["kernel"],
                                sd["classifier.weight"].T)
  # HSAKD's stride-1 variant names it `classifier`; a RepDistiller-style file maps onto that too.
  variables, _ = import_teacher.convert(str(path), "MobileNetV2_stride1", 100)
  assert "classifier" in variables["params"]["backbone"]


# --- misfits and bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("arch,classes,message", [
    ("resnet8", 100, "the checkpoint has 'layer1.0.downsample.0.weight' \\(shape "
                     "\\(64, 32, 1, 1\\)\\), which the architecture lacks"),
    ("resnet8x4", 10, "'fc.weight' has shape \\(100, 256\\) in the checkpoint, the architecture "
                      "expects \\(10, 256\\)"),
    ("resnet32x4", 100,
     "the checkpoint lacks 'layer1.1.conv1.weight' \\(shape \\(64, 64, 3, 3\\)\\)"),
])
def test_a_misfit_names_the_first_pytorch_key(arch, classes, message):
  with pytest.raises(UserError, match=f"does not fit {arch} with {classes} classes: {message}"):
    import_teacher.convert(str(CKPTS / "resnet8x4_sskd_format.pth"), arch, classes)


def test_bad_input_gives_one_clear_error(tmp_path):
  good = str(CKPTS / "resnet8x4_sskd_format.pth")
  with pytest.raises(UserError, match="unknown model 'resnet9'"):
    import_teacher.convert(good, "resnet9", 100)
  with pytest.raises(UserError, match="no entry 'net'.*'epoch', 'state_dict', 'acc'"):
    import_teacher.convert(good, "resnet8x4", 100, key="net")
  with pytest.raises(UserError, match="does not exist"):
    import_teacher.convert(str(tmp_path / "nope.pth"), "resnet8x4", 100)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(UserError, match="junk.pth"):
    import_teacher.convert(str(junk), "resnet8x4", 100)
  no_sd = tmp_path / "no_sd.pth"
  _torch_save(lambda t, s: {"epoch": 3, "weights": [t(np.zeros(2, np.float32))]}, no_sd)
  with pytest.raises(UserError, match="no state dict found.*--key"):
    import_teacher.convert(str(no_sd), "resnet8x4", 100)


def test_torch_keys_are_the_reference_keys(golden):
  _, state_dict = golden
  want = [(k, v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
  got = import_teacher._torch_view(import_teacher.template("resnet8x4", 100))
  assert list(got.items()) == want  # the same keys, shapes and order


# --- the command and a run with its output -------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """`python -m jaxkd.import_teacher` on the RepDistiller layout, as a user runs it."""
  out = tmp_path_factory.mktemp("teacher") / "resnet8x4.msgpack"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxkd.import_teacher", "--arch", "resnet8x4", "--num_classes", "100",
       "--out", str(out), str(CKPTS / "resnet8x4_repdistiller_format.pth")],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_cli_writes_a_teacher_file(imported, golden):
  out, stdout = imported
  assert f"--config.teacher.checkpoint={out}" in stdout and "1,233,540 parameters" in stdout
  loaded = checkpoint.import_variables(str(out), import_teacher.template("resnet8x4", 100))
  data, _ = golden
  np.testing.assert_allclose(_logits(loaded, data["input"]), data["logits"], atol=1e-4)


def test_imported_teacher_drives_a_student_stage(imported, tmp_path, monkeypatch):
  out, _ = imported
  # mock_data swaps the filesystem (tfds MockFs) while a split is opened, which can hit orbax's
  # background save thread mid-write; saving synchronously keeps the two apart.
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManagerOptions", functools.partial(
      checkpoint.ocp.CheckpointManagerOptions, enable_async_checkpointing=False))
  config = demo.get_config("runlocal")
  config.dataset = helpers.dataset_config("cifar100", tmp_path / "tfds", num_train_examples=16,
                                          num_eval_examples=8)
  config.teacher.name, config.teacher.checkpoint = "resnet8x4", str(out)
  config.student.name = "resnet8"
  config.method.name = "kd"
  config.baselines = ""
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 8, 1
  with tfds.testing.mock_data(num_examples=16):
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert [r["stage"] for r in results] == ["teacher", "student_kd"]
  assert results[0]["method"] == "imported" and results[0]["checkpoint"] == str(out)
  student = results[1]
  assert student["teacher_sha256"] == checkpoint.file_sha256(str(out))
  assert student["steps"] == 2 and 0.0 <= student["top1_last"] <= 100.0


# --- back to PyTorch -----------------------------------------------------------------------------


def _golden_state_dict(name):
  with np.load(DATA / name) as npz:
    return {k: npz[k] for k in json.loads(str(npz["meta"]))["state_keys"]}


def _assert_same_state_dict(got, want):
  """Key for key, value for value: the same dtypes (int64 num_batches_tracked), shapes, bits."""
  assert list(got) == list(want)
  for key, value in want.items():
    assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("golden_file,arch", [("golden_resnet8x4.npz", "resnet8x4"),
                                              ("golden_wrn_16_2.npz", "wrn_16_2")])
def test_import_then_export_gives_back_the_golden_state_dict(golden_file, arch, tmp_path):
  want = _golden_state_dict(golden_file)
  pth = tmp_path / "reference.pth"
  _torch_save(lambda t, s: {"model": collections.OrderedDict((k, t(v)) for k, v in want.items()),
                            "epoch": 240}, pth)
  variables, _ = import_teacher.convert(str(pth), arch, 100)
  msgpack = str(tmp_path / "network.msgpack")
  checkpoint.export_variables(msgpack, variables)
  got, report = export_student.torch_state_dict(arch, msgpack)
  _assert_same_state_dict(got, want)
  assert (report["num_classes"], report["channels"], report["left_out"]) == (100, 3, [])


def test_export_reads_the_sizes_off_the_file_and_names_what_it_fits(tmp_path):
  """A digits network (10 classes, one channel) with a head beside it: the sizes come from
  the file, the head is left out, and a wrong --model is told the network the file fits."""
  from jaxkd import networks  # pylint: disable=g-import-not-at-top
  shapes = networks.variable_shapes(networks.build_network("resnet8", 10), (8, 8, 1))
  variables = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  variables["params"]["heads"] = {"proj": {"kernel": np.ones((64, 8), np.float32)}}
  path = str(tmp_path / "digits.msgpack")
  checkpoint.export_variables(path, variables)
  state_dict, report = export_student.torch_state_dict("resnet8", path)
  assert (report["num_classes"], report["channels"], report["left_out"]) == (10, 1, ["heads"])
  assert state_dict["conv1.weight"].shape == (16, 1, 3, 3)
  assert state_dict["fc.weight"].shape == (10, 64)
  assert state_dict["bn1.num_batches_tracked"].dtype == np.int64
  with pytest.raises(UserError, match=r"does not fit resnet14 with 10 classes: missing leaf .*; "
                                      r"it fits resnet8 \(set --model=resnet8\)"):
    export_student.torch_state_dict("resnet14", path)
  with pytest.raises(UserError, match="unknown model 'resnet9'"):
    export_student.torch_state_dict("resnet9", path)
  with pytest.raises(UserError, match="does not exist"):
    export_student.torch_state_dict("resnet8", str(tmp_path / "none.msgpack"))


def test_export_cli_writes_safetensors_that_torch_loads(imported, tmp_path):
  """`python -m jaxkd.export_student` on the imported teacher: the file safetensors.torch's
  load_file reads (read here with its numpy API) holds the reference state_dict."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = tmp_path / "student.safetensors"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxkd.export_student", "--model", "resnet8x4", "--variables",
       str(imported[0]), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr[-3000:]
  assert "1,233,540 parameters in 62 state_dict entries" in proc.stdout
  want = _golden_state_dict("golden_resnet8x4.npz")
  got = st_numpy.load_file(str(out))
  _assert_same_state_dict({k: got[k] for k in want}, want)
  assert set(got) == set(want)
  with safe_open(str(out), framework="numpy") as f:
    assert f.metadata()["format"] == "pt"  # What transformers and timm expect of a torch file.
