"""Sample grids during training, from the EMA params, with fixed noise so grids are comparable."""

import os
from typing import Callable

import numpy as np

from jaxdiff import images
from jaxdiff.train import builder
from jaxdiff.train.state import TrainState


def make_preview_fn(run: builder.Run) -> Callable[[TrainState], np.ndarray]:
  """state -> uint8 [N, H, W, C]: `config.sample.num_images` EMA samples, the same noise and
  labels at every step of the run (see `builder.make_ema_sampler`)."""
  num_images = run.config.sample.num_images
  generate = builder.make_ema_sampler(run, builder.PREVIEW_STREAM, num_images)
  return lambda state: generate(state, num_images)


def save_grid(workdir: str, step: int, samples: np.ndarray) -> tuple[str, np.ndarray]:
  """Writes samples [N, H, W, C] to WORKDIR/samples/step_XXXXXX.png; returns (path, grid)."""
  grid = images.make_grid(samples)
  path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
  images.save_png(path, grid)
  return path, grid
