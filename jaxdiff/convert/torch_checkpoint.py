"""A small, safe reader for `torch.save` checkpoints that needs no torch.

Reads the two on-disk layouts torch has used for state dicts:
- the zip archive (torch >= 1.6): `<dir>/data.pkl` plus one raw record per storage
  under `<dir>/data/<key>`, and an optional `<dir>/byteorder` record;
- the legacy stream (older torch, e.g. pytorch-fid's 2019 Inception weights): pickles of the
  magic number, protocol version and system info, the object pickle, the list of storage keys,
  then each storage as an int64 element count followed by its raw bytes.

The unpickler only rebuilds tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`),
storage types and `OrderedDict`; any other global is refused, so a malicious file cannot run
code. Tensors come back as NumPy arrays.
"""
import collections
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class TorchCheckpointError(ValueError):
  """The file is not a torch checkpoint this reader can read safely."""


class _StorageType(NamedTuple):
  dtype: Any


class _StorageRef(NamedTuple):
  key: str
  dtype: Any


class _PendingTensor(NamedTuple):
  """A tensor whose storage bytes may not have been read yet (legacy files)."""
  storage: _StorageRef
  offset: int
  shape: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Irrelevant for inference weights.
  return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a tensor state dict needs."""

  def __init__(self, file, storage_from_id):
    super().__init__(file)
    self._storage_from_id = storage_from_id

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise TorchCheckpointError(
        f"refusing to load global {module}.{name}: only tensor state dicts are supported")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise TorchCheckpointError(f"unsupported persistent id {pid!r}")
    return self._storage_from_id(pid[1:])


def _materialise(obj, storages):
  """Replaces every `_PendingTensor` in nested dicts/lists/tuples by a NumPy array."""
  if isinstance(obj, _PendingTensor):
    flat = storages[obj.storage.key]
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[obj.offset:], shape=obj.shape, strides=[s * itemsize for s in obj.stride])
    return np.array(view)
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages) for v in obj)
  return obj


def _load_zip(path):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise TorchCheckpointError(f"{path}: zip archive without a single data.pkl")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode()
    refs = {}

    def storage_from_id(data):
      storage_type, key, _, _ = data
      refs[str(key)] = _StorageRef(str(key), storage_type.dtype)
      return refs[str(key)]

    with archive.open(pickles[0]) as f:
      obj = _RestrictedUnpickler(f, storage_from_id).load()
    storages = {}
    for key, ref in refs.items():
      dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
      storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype).astype(ref.dtype)
  return _materialise(obj, storages)


def _load_legacy(path):
  refs = {}

  def storage_from_id(data):
    storage_type, key, _, _, view_metadata = data
    if view_metadata is not None:
      raise TorchCheckpointError(f"{path}: storage views are not supported")
    refs[str(key)] = _StorageRef(str(key), storage_type.dtype)
    return refs[str(key)]

  with open(path, "rb") as f:
    header = [_RestrictedUnpickler(f, storage_from_id).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC_NUMBER or header[1] != _LEGACY_PROTOCOL_VERSION:
      raise TorchCheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
    byteorder = "<" if header[2].get("little_endian", True) else ">"
    obj = _RestrictedUnpickler(f, storage_from_id).load()
    keys = _RestrictedUnpickler(f, storage_from_id).load()
    storages = {}
    for key in keys:
      dtype = refs[str(key)].dtype
      (numel,) = struct.unpack(byteorder + "q", f.read(8))
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise TorchCheckpointError(f"{path}: truncated storage {key}")
      storages[str(key)] = np.frombuffer(raw, dtype.newbyteorder(byteorder)).astype(dtype)
  return _materialise(obj, storages)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict saved with `torch.save` (zip or legacy format) without torch.

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    {name: array} with each tensor's dtype and shape; parameters become plain arrays.

  Raises:
    TorchCheckpointError: the file is not a readable torch state dict, or it references a
      global other than tensors, storages and OrderedDict.
  """
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      obj = _load_legacy(path)
  except TorchCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError, ValueError,
          UnicodeDecodeError, struct.error, zipfile.BadZipFile) as e:
    raise TorchCheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
  if not isinstance(obj, dict):
    raise TorchCheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return dict(obj)
