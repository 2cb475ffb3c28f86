"""Tests of jaxdiff.data.fit against NumPy closed forms (padding, channel copies, luma) and PIL
(bicubic resizes, mode conversions) computed independently here."""
import numpy as np
from PIL import Image
import pytest

from jaxdiff.data import fit


def _noise(*shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("height,width", [(28, 28), (5, 8), (16, 3), (16, 16)])
@pytest.mark.parametrize("as_pil", [False, True])
def test_pad_centres_with_the_odd_pixel_bottom_right(height, width, as_pil):
  image = _noise(height, width, 1)
  source = Image.fromarray(image[..., 0], mode="L") if as_pil else image
  size = max(16, height, width) + (4 if height == 28 else 0)
  top, left = (size - height) // 2, (size - width) // 2
  expected = np.pad(image, ((top, size - height - top), (left, size - width - left), (0, 0)))
  got = fit.fit_image(source, size, 1, "pad")
  assert got.dtype == np.uint8 and got.shape == (size, size, 1)
  np.testing.assert_array_equal(got, expected)


def test_gray_to_rgb_repeats_the_channel_and_is_writable():
  image = _noise(5, 7, 1)
  got = fit.fit_image(image, 9, 3, "pad")
  expected = np.pad(np.repeat(image, 3, axis=-1), ((2, 2), (1, 1), (0, 0)))
  np.testing.assert_array_equal(got, expected)
  same_size = fit.fit_image(_noise(9, 9, 1), 9, 3, "pad")
  np.testing.assert_array_equal(same_size, np.repeat(_noise(9, 9, 1), 3, axis=-1))
  assert same_size.flags.c_contiguous
  same_size[0, 0, 0] = 1  # a real array, not a read-only broadcast view


def test_rgb_to_gray_is_itu_601_luma():
  image = _noise(6, 6, 3)
  luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  got = fit.fit_image(image, 6, 1, "pad")
  assert got.shape == (6, 6, 1)
  # PIL rounds its fixed-point luma; the closed form is exact to within one grey level.
  np.testing.assert_allclose(got[..., 0], luma, rtol=0, atol=1.0)
  np.testing.assert_array_equal(got[..., 0], np.asarray(Image.fromarray(image).convert("L")))


def test_alpha_is_dropped():
  image = _noise(4, 5, 4)
  np.testing.assert_array_equal(fit.fit_image(image, 6, 3, "pad")[1:5, 0:5], image[..., :3])


@pytest.mark.parametrize("height,width,fit_mode", [
    (23, 37, "resize"), (40, 20, "resize"), (16, 48, "resize"), (9, 12, "resize"),
    (20, 20, "pad")])  # pad falls back to resize for an image larger than the square
def test_resize_scales_the_shorter_side_then_crops_the_centre(height, width, fit_mode):
  image, size = _noise(height, width, 3), 16
  scale = size / min(height, width)
  new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height),
                                                     Image.Resampling.BICUBIC))
  top, left = (new_height - size) // 2, (new_width - size) // 2
  got = fit.fit_image(image, size, 3, fit_mode)
  np.testing.assert_array_equal(got, resized[top:top + size, left:left + size])


def test_resize_of_a_square_of_the_right_size_is_the_identity_and_flat_stays_flat():
  image = _noise(16, 16, 3)
  np.testing.assert_array_equal(fit.fit_image(image, 16, 3, "resize"), image)
  flat = np.full((48, 32, 3), (10, 200, 77), np.uint8)
  np.testing.assert_array_equal(fit.fit_image(flat, 16, 3, "resize"),
                                np.full((16, 16, 3), (10, 200, 77), np.uint8))


@pytest.mark.parametrize("mode,channels", [("LA", 1), ("P", 3), ("I;16", 1)])
def test_pil_modes_convert_as_pil_does(mode, channels):
  source = Image.fromarray(_noise(10, 12, 3)).convert(mode)
  expected = np.asarray(source.convert("L" if channels == 1 else "RGB"))
  expected = expected[..., None] if channels == 1 else expected
  got = fit.fit_image(source, 16, channels, "pad")
  np.testing.assert_array_equal(got[3:13, 2:14], expected)
  assert got.sum(axis=-1)[:3].max() == 0 and got.sum(axis=-1)[:, :2].max() == 0


def test_to_pil_modes_and_errors():
  assert fit.to_pil(_noise(3, 4)).mode == "L"
  assert fit.to_pil(_noise(3, 4, 1)).mode == "L"
  assert fit.to_pil(_noise(3, 4, 3)).mode == "RGB"
  assert fit.to_pil(_noise(3, 4, 4)).mode == "RGBA"
  np.testing.assert_array_equal(np.asarray(fit.to_pil(_noise(3, 4, 3))), _noise(3, 4, 3))
  with pytest.raises(ValueError, match="uint8"):
    fit.to_pil(np.zeros((3, 4, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[H, W, 1\|3\|4\]"):
    fit.to_pil(np.zeros((3, 4, 2), np.uint8))
