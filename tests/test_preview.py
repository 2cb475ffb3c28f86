"""jaxdiff.train.preview: EMA sample grids during training."""

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff import images
from jaxdiff.train import builder, preview

from test_builder import tiny_config


def test_preview_is_the_ema_sampler_with_the_preview_stream_and_is_fixed():
  config = tiny_config()
  config.sample.num_images = 3
  run = builder.build_run(config, devices=jax.devices()[:1])
  state = builder.init_state(run)
  grid_fn = preview.make_preview_fn(run)
  first = grid_fn(state)
  assert first.shape == (3, 8, 8, 1) and first.dtype == np.uint8
  np.testing.assert_array_equal(grid_fn(state), first)  # same noise at every step of a run
  want = builder.make_ema_sampler(run, builder.PREVIEW_STREAM, batch_size=3)(state, 3)
  np.testing.assert_array_equal(first, want)
  other = builder.make_ema_sampler(run, builder.FID_STREAM, batch_size=3)(state, 3)
  assert np.mean(other != first) > 0.5  # FID draws its own noise


def test_save_grid_writes_the_grid_png(tmp_path):
  samples = np.arange(4 * 5 * 5 * 1, dtype=np.uint8).reshape(4, 5, 5, 1)
  path, grid = preview.save_grid(str(tmp_path), 12, samples)
  assert path == str(tmp_path / "samples" / "step_000012.png")
  np.testing.assert_array_equal(grid, images.make_grid(samples))
  with Image.open(path) as png:
    np.testing.assert_array_equal(np.asarray(png), grid[..., 0])


@pytest.mark.slow  # trains an autoencoder run (about 25 s on 2 cores)
def test_autoencoder_preview_shows_the_first_images_beside_their_reconstructions():
  from configs import mnist_autoencoder  # pylint: disable=g-import-not-at-top
  from jaxdiff import data  # pylint: disable=g-import-not-at-top
  config = mnist_autoencoder.get_config("tiny")
  config.sample.num_images = 3
  run = builder.build_run(config, devices=jax.devices()[:1])
  state = builder.init_state(run)
  pairs = preview.make_preview_fn(run)(state)
  assert pairs.shape == (3, 16, 32, 1) and pairs.dtype == np.uint8
  originals = next(data.iterate_dataset(run.config.data, batch_size=3))["image"]
  np.testing.assert_array_equal(pairs[:, :, :16], originals)  # dataset order: fixed images
  x = originals.astype(np.float32) / 127.5 - 1
  params = state.ema_params["ema_0p9"]  # config.sample.ema_decay: the first of (0.9, 0.99)
  reconstructed = run.model.apply({"params": params}, x)[0]  # decoded posterior mean
  diff = np.abs(pairs[:, :, 16:].astype(int) - images.to_uint8(reconstructed).astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # jitted vs eager: rounding at .5
