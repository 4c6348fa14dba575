"""Reads PyTorch checkpoints (`torch.save` files) into numpy, without PyTorch and without running
anything the file asks for.

A `.pth` file is a pickle. Unpickling calls whatever callables the pickle names, so a plain
`pickle.load` (or `torch.load(weights_only=False)`) on a stranger's file can run any command.
Here the unpickler resolves only the handful of names a state dict needs and maps each of them to a
local stand-in that builds numpy arrays:

  torch._utils._rebuild_tensor_v2 / _rebuild_tensor   -> an array viewed out of a storage
  torch._utils._rebuild_parameter[_with_state]         -> the parameter's data
  torch.<Type>Storage, torch.UntypedStorage             -> the dtype of a storage
  collections.OrderedDict                               -> collections.OrderedDict
  numpy scalar / dtype (a pickled `np.float64` accuracy) -> a numpy scalar

Any other global (a model class, `posix.system`, `builtins.eval`, ...) stops the load with a
`UserError` at the moment the pickle names it, before it could be called: nothing in the file runs.

Both serialisations of `torch.save` are read: the zip archive (PyTorch >= 1.6: `<dir>/data.pkl`
plus one raw file per storage in `<dir>/data/`) and the legacy stream (magic number, protocol,
system info, the pickle, the storage keys, then each storage as an int64 element count and raw
bytes). The pre-1.0 tar variant of the legacy format is not supported.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional

import ml_dtypes
import numpy as np

from jaxkd import paths
from jaxkd.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> element dtype (little-endian; byte order is fixed up per file).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}

# Numeric numpy dtypes a pickled numpy scalar may have.
_SCALAR_KINDS = set("biuf?")


class _StorageType:
  """What `torch.FloatStorage` and friends resolve to: just the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A flat typed buffer; `data` is filled when the file's bytes for it are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, int(numel)
    self.data: Optional[np.ndarray] = None
    self.view_of: Optional[tuple["_Storage", int]] = None  # (root, element offset): legacy views

  def array(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      return root.array()[offset:offset + self.numel]
    if self.data is None:
      raise UserError("malformed PyTorch checkpoint: a tensor's storage has no data")
    return self.data


class _Tensor:
  """A tensor waiting for its storage bytes (the legacy format stores them after the pickle)."""

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, _Storage):
      raise UserError("malformed PyTorch checkpoint: a tensor is not built from a storage")
    ints = lambda v: all(isinstance(i, int) and i >= 0 for i in v)
    if not (isinstance(offset, int) and offset >= 0 and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and ints(size) and ints(stride)):
      raise UserError("malformed PyTorch checkpoint: bad tensor size/stride")
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array()
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise UserError(f"malformed PyTorch checkpoint: a tensor of shape {self.size} reads past "
                      f"the end of its storage ({flat.size} elements)")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=tuple(s * itemsize for s in self.stride),
        writeable=False)
    native = flat.dtype.newbyteorder("=") if flat.dtype.byteorder in "<>" else flat.dtype
    return np.array(view, dtype=native)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Stands in for `torch._utils._rebuild_tensor` and `_rebuild_tensor_v2` (requires_grad,
  backward hooks and metadata are ignored: they do not change the values)."""
  del unused
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  """Stands in for `torch._utils._rebuild_parameter[_with_state]`: a Parameter is its data."""
  del unused
  return data


class _NumpyDType:
  """Stands in for `numpy.dtype(name, align, copy)`; only plain numeric dtypes, no pickled state
  is applied beyond the byte order."""

  def __init__(self, name, *unused):
    del unused
    try:
      self.dtype = np.dtype(str(name))
    except TypeError:
      raise UserError(f"PyTorch checkpoint holds a numpy dtype {name!r} that is not a plain "
                      "number type; refusing it") from None
    if self.dtype.kind not in _SCALAR_KINDS:
      raise UserError(f"PyTorch checkpoint holds a numpy dtype {name!r} that is not a plain "
                      "number type; refusing it")

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  """Stands in for `numpy.core.multiarray.scalar(dtype, bytes)`."""
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes) or \
      len(data) != dtype.dtype.itemsize:
    raise UserError("malformed PyTorch checkpoint: bad numpy scalar")
  return np.frombuffer(data, dtype.dtype)[0]


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler whose every global is looked up in `_ALLOWED` (or is a storage type) and whose
  persistent ids must be storages; `storage_for(typ, key, numel, view)` supplies those."""

  def __init__(self, file, path: str, storage_for: Callable[..., _Storage]):
    super().__init__(file, encoding="utf-8")
    self._path, self._storage_for = path, storage_for

  def find_class(self, module: str, name: str) -> Any:
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    try:
      return _ALLOWED[(module, name)]
    except (KeyError, TypeError):
      pass
    raise UserError(
        f"refusing to load {self._path!r}: its pickle asks for {module}.{name}, which a weights "
        "file never needs (loading it could run code from the file). Only tensors, storages and "
        "plain containers are read; if this is a whole pickled model, save "
        "`model.state_dict()` with torch.save instead")

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
      kind = _ascii(pid[0]) if isinstance(pid, tuple) and pid else type(pid).__name__
      raise UserError(f"refusing to load {self._path!r}: it references a persistent object of "
                      f"kind {kind!r}; only tensor storages are read")
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise UserError(f"malformed PyTorch checkpoint {self._path!r}: bad storage type")
    return self._storage_for(storage_type, *pid[2:])


def _ascii(value: Any) -> Any:
  return value.decode("ascii") if isinstance(value, bytes) else value


def _materialize(obj: Any) -> Any:
  """Replaces every pending tensor inside dicts / lists / tuples by its numpy array."""
  if isinstance(obj, _Tensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v)
    return out
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  if isinstance(obj, _Storage):
    return obj.array().copy()
  return obj


def _file_dtype(dtype: np.dtype, big_endian: bool) -> np.dtype:
  """The storage dtype with the file's byte order (bfloat16 has no big-endian numpy form)."""
  if not big_endian or dtype.itemsize == 1:
    return dtype
  if dtype == np.dtype(ml_dtypes.bfloat16):
    raise UserError("big-endian bfloat16 checkpoints are not supported")
  return dtype.newbyteorder(">")


def _load_zip(path: str, archive: zipfile.ZipFile) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
  if any(n.endswith("constants.pkl") for n in names):
    raise UserError(f"{path!r} is a TorchScript archive (torch.jit.save); save the model's "
                    "state_dict() with torch.save instead")
  if len(pickles) != 1:
    raise UserError(f"{path!r} is a zip file but not a torch.save checkpoint (no single "
                    "data.pkl inside)")
  root = pickles[0][:-len("data.pkl")]
  big_endian = False
  if f"{root}byteorder" in names:
    order = archive.read(f"{root}byteorder").strip()
    if order not in (b"little", b"big"):
      raise UserError(f"malformed PyTorch checkpoint {path!r}: byteorder {order!r}")
    big_endian = order == b"big"
  storages: dict[str, _Storage] = {}

  def storage_for(storage_type: _StorageType, key: Any, location: Any, numel: Any) -> _Storage:
    del location  # Everything lands on the host.
    key = str(_ascii(key))
    if key not in storages:
      dtype = _file_dtype(storage_type.dtype, big_endian)
      member = f"{root}data/{key}"
      if member not in names or not isinstance(numel, int):
        raise UserError(f"malformed PyTorch checkpoint {path!r}: storage {key!r} is missing")
      raw = archive.read(member)
      if len(raw) < numel * dtype.itemsize:
        raise UserError(f"malformed PyTorch checkpoint {path!r}: storage {key!r} is truncated")
      storage = _Storage(dtype, numel)
      storage.data = np.frombuffer(raw, dtype, count=numel)
      storages[key] = storage
    return storages[key]

  unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, storage_for)
  return _materialize(unpickler.load())


def _load_legacy(path: str, stream: io.BytesIO) -> Any:
  """The pre-1.6 stream: magic, protocol, sys_info, pickle, storage keys, raw storages."""
  header = []
  for _ in range(3):
    # The three header pickles are plain numbers and a dict; the restricted unpickler reads them
    # too, so even they cannot name a callable.
    header.append(_RestrictedUnpickler(stream, path, _no_storage(path)).load())
  magic, protocol, sys_info = header
  if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
    raise UserError(f"{path!r} is not a PyTorch checkpoint (neither a torch.save zip archive "
                    "nor the legacy format)")
  big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
  storages: dict[str, _Storage] = {}

  def storage_for(storage_type: _StorageType, root_key: Any, location: Any, numel: Any,
                  view_metadata: Any = None) -> _Storage:
    del location
    root_key = str(_ascii(root_key))
    if not isinstance(numel, int) or numel < 0:
      raise UserError(f"malformed PyTorch checkpoint {path!r}: bad storage size")
    if root_key not in storages:
      storages[root_key] = _Storage(_file_dtype(storage_type.dtype, big_endian), numel)
    root = storages[root_key]
    if view_metadata is None:
      return root
    view_key, offset, view_size = view_metadata
    del view_key  # A view is a window of its root storage, which holds the bytes.
    view = _Storage(root.dtype, view_size)
    view.view_of = (root, int(offset))
    return view

  result = _RestrictedUnpickler(stream, path, storage_for).load()
  keys = _RestrictedUnpickler(stream, path, _no_storage(path)).load()
  if not isinstance(keys, list):
    raise UserError(f"malformed PyTorch checkpoint {path!r}: bad storage key list")
  for key in keys:
    key = str(_ascii(key))
    storage = storages.get(key)
    if storage is None:
      raise UserError(f"malformed PyTorch checkpoint {path!r}: unknown storage {key!r}")
    count_bytes = stream.read(8)
    if len(count_bytes) != 8:
      raise UserError(f"malformed PyTorch checkpoint {path!r}: truncated storage {key!r}")
    (count,) = struct.unpack("<q", count_bytes)
    raw = stream.read(count * storage.dtype.itemsize)
    if count < 0 or len(raw) != count * storage.dtype.itemsize:
      raise UserError(f"malformed PyTorch checkpoint {path!r}: truncated storage {key!r}")
    storage.data = np.frombuffer(raw, storage.dtype)
    storage.numel = count
  return _materialize(result)


def _no_storage(path: str) -> Callable[..., _Storage]:
  def refuse(*unused):
    raise UserError(f"malformed PyTorch checkpoint {path!r}: a storage outside the main pickle")
  return refuse


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

  Containers come back as dicts / OrderedDicts / lists / tuples, numbers as Python or numpy
  scalars. Raises `UserError` for a missing or malformed file and for a pickle that names anything
  beyond what tensors need (see the module docstring) -- before that thing could run.
  """
  fix = "a .pth / .pt file torch.save wrote"
  paths.check_regular_file(path, "PyTorch checkpoint", fix)
  if not os.path.isfile(path):
    raise UserError(f"PyTorch checkpoint {path!r} does not exist")
  blob = paths.read_whole(path, "PyTorch checkpoint", fix)
  try:
    if zipfile.is_zipfile(io.BytesIO(blob)):
      with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return _load_zip(path, archive)
    return _load_legacy(path, io.BytesIO(blob))
  except UserError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, struct.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise UserError(f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
                    ) from None


# --- state dicts inside checkpoints ---------------------------------------------------------------

# Where the usual training scripts keep the state dict: RepDistiller / CRD / mdistiller 'model',
# SSKD and HSAKD's pretrained backbones 'state_dict', HSAKD's own checkpoints 'net'.
STATE_DICT_KEYS = ("model", "state_dict", "net")


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def find_state_dict(checkpoint: Any, key: str = "", path: str = "checkpoint") -> dict[str, Any]:
  """The state dict inside a loaded checkpoint: `checkpoint[key]` when `key` is given, else the
  first of `checkpoint['model' | 'state_dict' | 'net']` that is one, else the checkpoint itself
  when it is a flat {name: array} mapping."""
  if key:
    if not isinstance(checkpoint, Mapping) or key not in checkpoint:
      top = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
      raise UserError(f"{path!r} has no entry {key!r} (top level: {top})")
    if not _is_state_dict(checkpoint[key]):
      raise UserError(f"{path!r}[{key!r}] is not a state dict of named tensors")
    return dict(checkpoint[key])
  if isinstance(checkpoint, Mapping):
    for name in STATE_DICT_KEYS:
      if name in checkpoint and _is_state_dict(checkpoint[name]):
        return dict(checkpoint[name])
  if _is_state_dict(checkpoint):
    return dict(checkpoint)
  top = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
  raise UserError(f"no state dict found in {path!r} (top level: {top}); name the entry that "
                  "holds it with --key")


def strip_wrappers(state_dict: Mapping[str, Any], prefix: Optional[str] = None
                   ) -> tuple[dict[str, Any], list[str]]:
  """Removes the prefixes training wrappers add; returns (state dict, removed prefixes).

  `module.` (nn.DataParallel / DistributedDataParallel) is removed when every key has it. Then,
  when some keys start with `backbone.` (SSKD's wrapper, HSAKD's `*_aux` networks), only those are
  kept, without the prefix: the heads next to them (`proj_head.*`, `auxiliary_classifier.*`) are
  not part of the zoo network. An explicit `prefix` replaces this guess ('' keeps every key).
  """
  if prefix is not None:
    if not prefix:
      return dict(state_dict), []
    p = prefix if prefix.endswith(".") else prefix + "."
    out = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
    if not out:
      raise UserError(f"no state_dict key starts with {p!r} (keys start like: "
                      f"{', '.join(list(state_dict)[:5])})")
    return out, [p]
  removed = []
  out = dict(state_dict)
  while out and all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
    removed.append("module.")
  if any(k.startswith("backbone.") for k in out):
    out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    removed.append("backbone.")
  return out, removed
