"""Tests for jaxdiff.images: quantisation, grid layout, PNG/GIF round trips."""

import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff import images


def test_to_uint8_matches_fid_quantisation():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99, 1.0, 2.0], dtype=np.float32)
  # round(clip((x + 1) * 127.5, 0, 255)), written out by hand.
  expected = np.array([0, 0, 0, 128, 191, 254, 255, 255], dtype=np.uint8)
  got = images.to_uint8(x)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_make_grid_places_each_image_in_its_cell():
  n, h, w = 5, 3, 4
  batch = np.stack([np.full((h, w, 1), 10 * (i + 1), np.uint8) for i in range(n)])
  grid = images.make_grid(batch, ncols=3, padding=1, pad_value=7)
  assert grid.shape == (2 * (h + 1) + 1, 3 * (w + 1) + 1, 1)
  for i in range(n):
    row, col = divmod(i, 3)
    top, left = 1 + row * (h + 1), 1 + col * (w + 1)
    np.testing.assert_array_equal(grid[top:top + h, left:left + w], batch[i])
  # The empty sixth cell and the borders are padding.
  np.testing.assert_array_equal(grid[1 + h + 1:, 1 + 2 * (w + 1):], 7)
  np.testing.assert_array_equal(grid[0], 7)


def test_make_grid_quantises_float_input():
  batch = np.zeros((4, 2, 2, 3), np.float32)
  grid = images.make_grid(batch, padding=0)
  assert grid.shape == (4, 4, 3)
  np.testing.assert_array_equal(grid, 128)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_round_trip(tmp_path, channels):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(6, 5, channels), dtype=np.uint8)
  path = tmp_path / "sub" / "x.png"
  images.save_png(path, image)
  loaded = np.asarray(Image.open(path))
  np.testing.assert_array_equal(loaded.reshape(image.shape), image)
  assert sorted(os.listdir(path.parent)) == ["x.png"]  # no temporary files left behind


def test_save_gif_writes_every_frame(tmp_path):
  frames = [np.full((4, 4, 3), v, np.uint8) for v in (0, 120, 250)]
  path = tmp_path / "t.gif"
  images.save_gif(path, frames, duration_ms=50)
  with Image.open(path) as gif:
    assert gif.n_frames == 3
    for index, frame in enumerate(frames):
      gif.seek(index)
      np.testing.assert_allclose(np.asarray(gif.convert("RGB")), frame, atol=2)


def test_bad_shapes_raise():
  with pytest.raises(ValueError):
    images.make_grid(np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(ValueError):
    images.save_png("/tmp/unused.png", np.zeros((2, 2, 2), np.uint8))


def test_npz_layout_and_animation_frames(tmp_path):
  samples = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
  path = str(tmp_path / "a" / "s.npz")
  images.save_npz(path, samples, np.array([4, 1]), {"method": "ddim", "seed": 3, "eta": 0.5})
  with np.load(path, allow_pickle=False) as data:
    assert sorted(data.files) == ["arr_0", "arr_1", "eta", "method", "seed"]
    np.testing.assert_array_equal(data["arr_0"], samples)
    assert data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], [4, 1])
    assert str(data["method"]) == "ddim" and int(data["seed"]) == 3 and float(data["eta"]) == 0.5
  images.save_npz(path, samples, None, {})
  with np.load(path, allow_pickle=False) as data:
    assert data.files == ["arr_0"]

  # Trajectory of 2 images over 11 states, state k filled with the value 10 * k.
  trajectory = np.broadcast_to((10 * np.arange(11, dtype=np.uint8))[None, :, None, None, None],
                               (2, 11, 4, 4, 3))
  frames = images.animation_frames(trajectory, 3)
  assert [frame[2, 2, 0] for frame in frames] == [0, 50, 100]  # States 0, 5 and 10.
  assert frames[0].shape == (4 + 2 * 2, 2 * 4 + 3 * 2, 3)  # One row of 2 images, padding 2.
  assert len(images.animation_frames(trajectory, 50)) == 11
