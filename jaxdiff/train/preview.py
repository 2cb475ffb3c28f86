"""Sample grids during training, from the EMA params, with fixed noise so grids are comparable."""

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff import images
from jaxdiff.config import Config
from jaxdiff.data import DatasetInfo
from jaxdiff.diffusion import Schedule, sample
from jaxdiff.train import sharding as sharding_lib


def grid_labels(num_images: int, num_classes: int) -> np.ndarray:
  """Labels cycling 0..num_classes-1 (all 0 for an unconditional model): int32 [num_images]."""
  return (np.arange(num_images) % max(num_classes, 1)).astype(np.int32)


def make_preview_fn(model, schedule: Schedule, config: Config, info: DatasetInfo, mesh: Mesh,
                    params_shardings: Any, key: jax.Array) -> Callable[[Any], np.ndarray]:
  """Builds params -> float32 images [N, H, W, C] in [-1, 1], jitted once.

  Args:
    model: the Flax module.
    schedule: the training schedule.
    config: run config (sample section: method, steps, eta, guidance, number of images).
    info: dataset description (image size, channels, classes).
    mesh: device mesh; images are split over it when their number allows.
    params_shardings: shardings of the params passed in.
    key: default noise key (the same for every grid of a run); FID passes one key per chunk.

  Returns:
    fn(params, key=key) -> float32 images [N, H, W, C].
  """
  cfg = config.sample
  n = cfg.num_images
  shape = (info.image_size, info.image_size, info.channels)
  conditional = config.model.class_conditional
  labels = jnp.asarray(grid_labels(n, info.num_classes))
  guidance = None if cfg.guidance_scale == 1.0 else cfg.guidance_scale

  def generate(params, key):
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))
    x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(example_keys)
    if n % mesh.size == 0:
      x_T = jax.lax.with_sharding_constraint(x_T, sharding_lib.batch_sharding(mesh))

    def model_fn(x, t):
      y = None
      if conditional:
        y = labels
        if guidance is not None:
          y = jnp.concatenate([labels, jnp.full_like(labels, info.num_classes)])
      return model.apply({"params": params}, x, t, y, train=False)

    return sample(model_fn, schedule, x_T, jax.vmap(jax.random.fold_in, (0, None))(example_keys, 1),
                  method=cfg.method, num_steps=cfg.num_steps, eta=cfg.eta,
                  prediction=config.diffusion.prediction, clip_denoised=cfg.clip_denoised,
                  guidance_scale=guidance,
                  variance="learned" if config.model.learn_sigma else "fixed_small")

  jitted = jax.jit(generate, in_shardings=(params_shardings, sharding_lib.replicated(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
  default_key = key
  return lambda params, key=default_key: np.asarray(jax.device_get(jitted(params, key)))


def save_grid(workdir: str, step: int, samples: np.ndarray) -> tuple[str, np.ndarray]:
  """Writes samples [N, H, W, C] to WORKDIR/samples/step_XXXXXX.png; returns (path, grid)."""
  grid = images.make_grid(images.to_uint8(samples))
  path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
  images.save_png(path, grid)
  return path, grid
