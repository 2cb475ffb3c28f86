"""Sample grids during training, from the EMA params, with fixed noise so grids are comparable."""

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff import images, sampling
from jaxdiff.config import Config
from jaxdiff.data import DatasetInfo
from jaxdiff.diffusion import Schedule
from jaxdiff.train import sharding as sharding_lib


def make_preview_fn(model, schedule: Schedule, config: Config, info: DatasetInfo, mesh: Mesh,
                    params_shardings: Any, key: jax.Array) -> Callable[..., np.ndarray]:
  """Builds (params, first_index=0) -> float32 images [N, H, W, C] in [-1, 1], jitted once.

  The sampler is `jaxdiff.sampling.make_batch_fn`, the one `python -m jaxdiff.sample` uses:
  image i (a global index) has its own noise and its label `i % num_classes`, so a grid is the
  same on any device count and consecutive chunks (FID) are `first_index = c * N`.

  Args:
    model: the Flax module.
    schedule: the training schedule.
    config: run config (sample section: method, steps, eta, guidance, number of images N).
    info: dataset description (image size, channels, classes).
    mesh: device mesh; images are split over it when their number allows.
    params_shardings: shardings of the params passed in.
    key: base noise key, the same for every grid of a run.
  """
  cfg = config.sample
  n = cfg.num_images
  num_classes = info.num_classes if config.model.class_conditional else 0
  diffusion_model = sampling.DiffusionModel(
      module=model, params=None, schedule=schedule, prediction=config.diffusion.prediction,
      image_shape=(info.image_size, info.image_size, info.channels), num_classes=num_classes,
      learn_sigma=config.model.learn_sigma,
      has_null_label=num_classes > 0 and config.model.class_dropout_prob > 0)
  settings = sampling.SamplerSettings(
      method=cfg.method, num_steps=cfg.num_steps, eta=cfg.eta, clip_denoised=cfg.clip_denoised,
      guidance_scale=cfg.guidance_scale)
  batch_fn = sampling.make_batch_fn(diffusion_model, settings)
  replicated = sharding_lib.replicated(mesh)
  per_image = sharding_lib.batch_sharding(mesh) if n % mesh.size == 0 else replicated
  jitted = jax.jit(batch_fn, in_shardings=(params_shardings, replicated, per_image, per_image),
                   out_shardings=replicated)
  # Every process holds a replica of the key; the inputs become global arrays (multi-host).
  key_data = sampling.global_array(
      np.asarray(jax.random.key_data(key).addressable_data(0)), replicated)

  def generate(params, first_index: int = 0) -> np.ndarray:
    indices = np.arange(first_index, first_index + n, dtype=np.int32)
    labels = sampling.example_labels(first_index + n, (), num_classes)[first_index:]
    images_out = jitted(params, key_data, sampling.global_array(indices, per_image),
                        sampling.global_array(labels, per_image))
    return np.asarray(images_out.addressable_data(0))
  return generate


def save_grid(workdir: str, step: int, samples: np.ndarray) -> tuple[str, np.ndarray]:
  """Writes samples [N, H, W, C] to WORKDIR/samples/step_XXXXXX.png; returns (path, grid)."""
  grid = images.make_grid(images.to_uint8(samples))
  path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
  images.save_png(path, grid)
  return path, grid
