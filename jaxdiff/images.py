"""Turning model outputs into image files: quantisation, grids, PNG, GIF and ADM-layout npz.

Shared by the training loop (sample grids) and the sample CLI. Images are NHWC; float images are
in [-1, 1]. Files are written to a temporary name and renamed, so a crash never leaves a
half-written image behind.
"""

import os
import tempfile
from typing import Any, Sequence

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """Quantises float images in [-1, 1] to uint8, as FID tooling expects.

  Args:
    x: float array [..., H, W, C] in [-1, 1] (values outside are clipped).

  Returns:
    uint8 array of the same shape: `round(clip((x + 1) * 127.5, 0, 255))`.
  """
  x = np.asarray(x, dtype=np.float32)
  return np.round(np.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def make_grid(images, ncols: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
  """Tiles a batch of images into one image, row by row.

  Args:
    images: uint8 [N, H, W, C] (float input is quantised with `to_uint8`).
    ncols: images per row; defaults to ceil(sqrt(N)).
    padding: pixels between images and around the border.
    pad_value: uint8 value of the padding pixels.

  Returns:
    uint8 [rows * (H + padding) + padding, ncols * (W + padding) + padding, C]; empty cells of
    the last row are left as padding.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f"make_grid expects images [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("make_grid needs at least one image")
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  ncols = min(ncols, n)
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                 pad_value, dtype=np.uint8)
  for index in range(n):
    row, col = divmod(index, ncols)
    top = padding + row * (h + padding)
    left = padding + col * (w + padding)
    grid[top:top + h, left:left + w] = images[index]
  return grid


def _to_pil(image) -> Image.Image:
  """[H, W, C] uint8 (C in {1, 3, 4}) or [H, W] -> PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = to_uint8(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"expected an image [H, W], [H, W, 1|3|4], got shape {image.shape}")
  return Image.fromarray(image)


def _atomic_save(path, save_fn) -> None:
  """Writes through `save_fn(tmp_path)` then renames, so readers never see a partial file."""
  path = os.fspath(path)
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  os.close(fd)
  try:
    save_fn(tmp_path)
    # mkstemp creates 0600; give the image the permissions a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def save_png(path, image) -> None:
  """Saves one image [H, W, C] (uint8, or float in [-1, 1]) as a PNG (lossless, for FID)."""
  pil_image = _to_pil(image)
  _atomic_save(path, lambda tmp: pil_image.save(tmp, format="PNG"))


def save_gif(path, frames: Sequence, duration_ms: int = 100, loop: int = 0) -> None:
  """Saves frames [T][H, W, C] (uint8 or float in [-1, 1]) as an animated GIF.

  Args:
    path: output file.
    frames: sequence (or array [T, H, W, C]) of images of equal shape.
    duration_ms: display time of each frame.
    loop: number of repeats; 0 loops forever.
  """
  pil_frames = [_to_pil(frame) for frame in frames]
  if not pil_frames:
    raise ValueError("save_gif needs at least one frame")
  _atomic_save(path, lambda tmp: pil_frames[0].save(
      tmp, format="GIF", save_all=True, append_images=pil_frames[1:], duration=duration_ms,
      loop=loop))


def save_npz(path, samples: np.ndarray, labels: np.ndarray | None,
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
  _atomic_save(path, lambda tmp: np.savez(tmp, **arrays))


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
  return [make_grid(trajectory[:, step]) for step in picks]
