"""Sample grids during training, from the EMA params, with fixed noise so grids are comparable.

An autoencoder run (config.task = "autoencoder") previews reconstructions instead: the first
images of the dataset, each beside its reconstruction.
"""

import os
from typing import Callable

import jax
import numpy as np

from jaxdiff import images, sampling
from jaxdiff.data import iterate_dataset
from jaxdiff.train import builder
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train.state import TrainState, ema_key


def make_preview_fn(run: builder.Run) -> Callable[[TrainState], np.ndarray]:
  """state -> uint8 [N, H, W, C]: `config.sample.num_images` EMA samples, the same noise and
  labels at every step of the run (see `builder.make_ema_sampler`); for an autoencoder run
  `make_reconstruction_fn`'s pairs."""
  if run.config.task == "autoencoder":
    return make_reconstruction_fn(run)
  num_images = run.config.sample.num_images
  generate = builder.make_ema_sampler(run, builder.PREVIEW_STREAM, num_images)
  return lambda state: generate(state, num_images)


def make_reconstruction_fn(run: builder.Run) -> Callable[[TrainState], np.ndarray]:
  """state -> uint8 [N, H, 2W, C]: the first N = `config.sample.num_images` images of the
  dataset (in dataset order, so the same at every step), each with its reconstruction
  decode(mean of q(z | x)) by the EMA params of `config.sample.ema_decay` on its right."""
  originals = next(iterate_dataset(run.config.data, batch_size=run.config.sample.num_images))
  originals = originals["image"]
  x = sampling.replicate(originals.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
                         run.mesh)
  ema = ema_key(run.config.sample.ema_decay)
  reconstruct = jax.jit(lambda params, x: run.model.apply({"params": params}, x)[0],
                        out_shardings=sharding_lib.replicated(run.mesh))

  def preview(state: TrainState) -> np.ndarray:
    reconstructed = images.to_uint8(np.asarray(reconstruct(state.ema_params[ema], x)))
    return np.concatenate([originals, reconstructed], axis=2)
  return preview


def save_grid(workdir: str, step: int, samples: np.ndarray) -> tuple[str, np.ndarray]:
  """Writes samples [N, H, W, C] to WORKDIR/samples/step_XXXXXX.png; returns (path, grid)."""
  grid = images.make_grid(samples)
  path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
  images.save_png(path, grid)
  return path, grid
