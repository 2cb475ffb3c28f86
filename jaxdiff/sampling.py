"""Sharded sampling whose result does not depend on the device count, and the files it writes.

Every random draw of sample i comes from its own key `fold_in(key(seed), i)`, i the sample's global
index in [0, num_samples): x_T is drawn from the first half of `split(key_i)` and the sampler's
step noise from the second; the label of sample i is a function of i as well. So the samples for
indices [0, n) are the same on 1 or 8 devices, for any batch size, and whether n or more samples
are drawn.

Every process runs the same global computation over a 1-D mesh of all devices (axis "data"); the
results are gathered to every process and process 0 writes the files.
"""

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff import diffusion, images

# Images in the sample grid PNG and in the reverse-process GIF (the first ones of the run).
GRID_IMAGES = 64
ANIMATION_IMAGES = 16

# (params, base key data uint32 [2], global indices int32 [B], labels int32 [B])
#   -> float32 [B, ...].
BatchFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to sample; passed unchanged to `jaxdiff.diffusion.sample`.

  Attributes:
    method: sampler name (see `jaxdiff.diffusion.sample`).
    num_steps: length of the timestep grid (heun evaluates the model 2n - 1 times).
    eta: DDIM stochasticity; 0 is deterministic.
    spacing: timestep grid: leading | trailing | linspace.
    clip_denoised: clip the predicted x_0 to [-1, 1] in every step (None: not yet resolved from
      the model's source, see `jaxdiff.sample`).
    guidance_scale: classifier-free guidance scale s; None or 1 sample the conditional model.
  """
  method: str = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  spacing: str = "leading"
  clip_denoised: bool | None = False
  guidance_scale: float | None = None

  @property
  def guided(self) -> bool:
    return self.guidance_scale is not None and self.guidance_scale != 1.0


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  """A trained denoiser and what is needed to sample from it.

  Attributes:
    module: Flax module called as `module.apply({"params": params}, x, t, y)` (models contract).
    params: its parameters.
    schedule: the noise schedule it was trained with.
    prediction: what the network predicts: eps | x0 | v.
    image_shape: (H, W, C) of one sample.
    num_classes: 0 for an unconditional model; the null label is `num_classes`.
    learn_sigma: the network also outputs C variance channels (after the C prediction channels).
    has_null_label: the label `num_classes` means "no label" (needed by guidance).
  """
  module: nn.Module
  params: Any
  schedule: diffusion.Schedule
  prediction: str
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  learn_sigma: bool = False
  has_null_label: bool = False


def seed_key_data(seed: int) -> np.ndarray:
  """The raw data (uint32 [2]) of `jax.random.key(seed)`, the base key of a sampling run."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


def example_keys(base_key_data: jax.Array, indices: jax.Array) -> jax.Array:
  """Per-example keys `fold_in(key(seed), i)`.

  Args:
    base_key_data: uint32 [2] from `seed_key_data`.
    indices: int32 [B] global sample indices.

  Returns:
    [B] typed PRNG keys.
  """
  base_key = jax.random.wrap_key_data(base_key_data)
  return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)


def example_labels(num_samples: int, labels: Sequence[int], num_classes: int) -> np.ndarray:
  """Label of each sample index: `labels[i % len(labels)]`, or `i % num_classes` if none given.

  Returns:
    int32 [num_samples]; zeros for an unconditional model (the labels are then unused).
  """
  indices = np.arange(num_samples)
  if num_classes == 0:
    return np.zeros(num_samples, np.int32)
  if len(labels):
    return np.asarray(labels, np.int32)[indices % len(labels)]
  return (indices % num_classes).astype(np.int32)


def _model_fn(model: DiffusionModel, params, labels: jax.Array, guided: bool):
  """`(x [B', H, W, C], t [B']) -> prediction` with the labels [B] bound.

  With guidance B' = 2B: the first half gets the labels, the second the null label, as
  `jaxdiff.diffusion.sample` expects.
  """
  if model.num_classes == 0:
    y = None
  elif guided:
    y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
  else:
    y = labels

  def model_fn(x, t):
    return model.module.apply({"params": params}, x, t, y, train=False)

  return model_fn


def make_batch_fn(model: DiffusionModel, settings: SamplerSettings, *,
                  trajectory: bool = False) -> BatchFn:
  """Builds the pure per-batch sampler that `generate` shards and jits.

  Args:
    model: the denoiser.
    settings: sampler settings.
    trajectory: return the reverse process instead of only the final samples.

  Returns:
    `(params, base_key_data [2], indices [B], labels [B]) -> float32 [B, H, W, C]`, or with
    `trajectory` `[B, F, H, W, C]` (F states x_t from x_T to the final sample). The parameters are
    an argument rather than a closure so that they are not baked into the executable.
  """
  def batch_fn(params, base_key_data, indices, labels):
    keys = example_keys(base_key_data, indices)
    split_keys = jax.vmap(jax.random.split)(keys)
    x_T = jax.vmap(lambda k: jax.random.normal(k, model.image_shape, jnp.float32))(
        split_keys[:, 0])
    # Guidance is applied by `sample` to the first C output channels only, so learned-variance
    # channels pass through from the conditional half.
    result = diffusion.sample(
        _model_fn(model, params, labels, settings.guided), model.schedule, x_T, split_keys[:, 1],
        method=settings.method, num_steps=settings.num_steps, eta=settings.eta,
        spacing=settings.spacing, prediction=model.prediction,
        clip_denoised=settings.clip_denoised,
        guidance_scale=settings.guidance_scale if settings.guided else None,
        variance="learned" if model.learn_sigma else "fixed_small",
        return_trajectory=trajectory)
    if trajectory:
      return jnp.moveaxis(result[1], 0, 1)
    return result

  return batch_fn


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh (axis "data") over `devices`, by default all devices of all processes."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def _replicated_array(leaf, sharding: NamedSharding) -> jax.Array:
  """A parameter copied to every device of the mesh, whichever process or device holds it now."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
  return global_array(np.asarray(leaf), sharding)


def generate(batch_fn: BatchFn, params, mesh: Mesh, labels: np.ndarray, *, seed: int,
             batch_size: int, progress: bool = True) -> np.ndarray:
  """Samples indices [0, len(labels)) in batches, each sharded over the mesh, as uint8.

  Every call has the same shape (the batch rounded up to the device count, the last batch padded
  with extra indices that are then dropped), so the sampler compiles once. The next batch is
  dispatched before the previous one is fetched, keeping the devices busy.

  Args:
    batch_fn: per-batch sampler from `make_batch_fn` (pure, not jitted).
    params: its first argument, replicated over the mesh.
    mesh: 1-D mesh with axis "data".
    labels: int32 [N], the label of each sample index.
    seed: base seed of the run.
    batch_size: samples per sampler call, all devices together.
    progress: show a tqdm bar (images done, images/s) on process 0.

  Returns:
    uint8 [N, ...] (`jaxdiff.images.to_uint8` of the sampler's output), on every process.
  """
  num_samples = len(labels)
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"need >= 1 sample and batch_size >= 1; got {num_samples}, {batch_size}")
  per_call = min(batch_size, num_samples)
  padded = math.ceil(per_call / mesh.devices.size) * mesh.devices.size
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sharded_fn = jax.jit(batch_fn, in_shardings=(replicated, replicated, data, data),
                       out_shardings=data)
  params = jax.tree.map(lambda leaf: _replicated_array(leaf, replicated), params)
  key_data = global_array(seed_key_data(seed), replicated)
  padded_labels = np.concatenate([labels, np.zeros(padded, np.int32)]).astype(np.int32)

  def dispatch(start: int) -> jax.Array:
    indices = np.arange(start, start + padded, dtype=np.int32)
    return sharded_fn(params, key_data, global_array(indices, data),
                      global_array(padded_labels[start:start + padded], data))

  starts = range(0, num_samples, per_call)
  output = None
  with tqdm.tqdm(total=num_samples, unit="img", desc="sampling",
                 disable=not progress or jax.process_index() != 0) as bar:
    pending = dispatch(starts[0])
    for position, start in enumerate(starts):
      # Queue the next batch before waiting for this one, so the devices never idle on the host.
      following = dispatch(starts[position + 1]) if position + 1 < len(starts) else None
      count = min(per_call, num_samples - start)
      batch = _fetch(pending, count)
      if output is None:
        output = np.empty((num_samples, *batch.shape[1:]), np.uint8)
      output[start:start + count] = batch
      bar.update(count)
      pending = following
  return output


def _fetch(result: jax.Array, count: int) -> np.ndarray:
  """Gathers a sharded batch to every process, keeps the first `count` rows and quantises them."""
  batch = multihost_utils.process_allgather(result, tiled=True)[:count]
  if not np.all(np.isfinite(batch)):
    raise FloatingPointError(
        "the sampler produced NaN or inf; check the checkpoint, the schedule and the prediction "
        "type (eps/x0/v)")
  return images.to_uint8(batch)


def write_npz(path: str, samples: np.ndarray, labels: np.ndarray | None,
              metadata: dict[str, Any]) -> None:
  """Writes samples in the layout of the ADM (guided-diffusion) evaluation suite.

  Args:
    path: output .npz.
    samples: uint8 [N, H, W, C] as `arr_0`.
    labels: int [N] as `arr_1` (class-conditional models), or None.
    metadata: scalars (str, int, float, bool) stored as extra 0-d arrays, e.g. method, seed.
  """
  arrays = {"arr_0": samples}
  if labels is not None:
    arrays["arr_1"] = np.asarray(labels, np.int64)
  arrays.update({key: np.asarray(value) for key, value in metadata.items()})
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp_path = path + ".tmp.npz"
  np.savez(tmp_path, **arrays)
  os.replace(tmp_path, path)


def animation_frames(trajectory: np.ndarray, num_frames: int) -> list[np.ndarray]:
  """Grids of the reverse process at `num_frames` evenly spaced states, first and last included.

  Args:
    trajectory: uint8 [B, F, H, W, C], states x_t from x_T to the final sample.
    num_frames: frames wanted (fewer if the trajectory is shorter).

  Returns:
    uint8 grid images [H', W', C], one per frame.
  """
  steps = trajectory.shape[1]
  picks = np.unique(np.round(np.linspace(0, steps - 1, min(num_frames, steps))).astype(int))
  return [images.make_grid(trajectory[:, step]) for step in picks]
