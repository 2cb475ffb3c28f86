"""Device mesh and shardings: data parallelism with optional FSDP.

The mesh has two axes, ("data", "fsdp"). Batches are split over both (every device sees
different examples). With fsdp > 1, each large parameter is split along its largest axis that the
fsdp size divides, and so are its EMA copies and Adam moments (they share its shape, so the same
rule gives them the same sharding); small parameters and scalars stay replicated.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

  Devices keep jax's process-major order, so each process owns a contiguous block of the batch,
  which is what `jax.make_array_from_process_local_data` expects from per-process loaders.

  Args:
    fsdp: size of the fsdp axis; must divide the device count.
    devices: devices to use; defaults to `jax.devices()`.

  Returns:
    Mesh of shape [num_devices // fsdp, fsdp].
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {len(devices)}")
  grid = np.array(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, ("data", "fsdp"))


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Sharding of a batch array: the batch axis (after `leading_dims` stacked axes) over all devices."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """PartitionSpec of one parameter-shaped array under FSDP.

  Args:
    shape: array shape.
    fsdp: size of the "fsdp" mesh axis.
    min_size: arrays with fewer elements stay replicated (sharding them costs more than it saves).

  Returns:
    P with "fsdp" on the largest axis divisible by `fsdp` (the first such axis on ties), or P().
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, neg_axis = max(candidates)
  spec = [None] * len(shape)
  spec[-neg_axis] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_tree: Any, min_size: int) -> Any:
  """NamedShardings for every leaf of a (train state) pytree, from its shapes alone.

  Args:
    mesh: the ("data", "fsdp") mesh.
    abstract_tree: pytree of arrays or `jax.ShapeDtypeStruct`s.
    min_size: see `param_spec`.

  Returns:
    Pytree of NamedSharding with the structure of `abstract_tree`.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, fsdp, min_size)), abstract_tree)


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles the global batch from this process's rows.

  Args:
    local_batch: pytree of host arrays; the batch axis holds this process's contiguous block
      of rows (after any stacked leading axes named None in `sharding`).
    sharding: the batch sharding (see `batch_sharding`).

  Returns:
    Pytree of global jax.Arrays sharded by `sharding`.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract_tree` carrying the matching leaves of `shardings`."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract_tree, shardings)
