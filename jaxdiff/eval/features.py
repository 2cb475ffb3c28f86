"""Batched Inception features on device, sharded over all devices on the batch axis."""
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.eval import inception


class ImageFormatError(ValueError):
  """Images are not uint8 [N, H, W, 1 or 3] in [0, 255]."""


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
  """Validates images for the FID network and returns them as uint8 [N, H, W, 3].

  Integer arrays with values in [0, 255] are accepted and cast; a single channel is repeated
  to RGB (as for MNIST). Float images are refused rather than guessed: quantise them with
  `round(clip((x + 1) * 127.5, 0, 255))` (`jaxdiff.images.to_uint8`) first.

  Raises:
    ImageFormatError: wrong rank, channel count, dtype or value range.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ImageFormatError(f"{what}: expected [N, H, W, 3] (NHWC), got shape {images.shape}")
  if not np.issubdtype(images.dtype, np.integer):
    hint = ""
    if images.size and images.min() >= -1.0 and images.max() <= 1.0:
      hint = " (values look like [-1, 1]: quantise with jaxdiff.images.to_uint8)"
    raise ImageFormatError(f"{what}: expected uint8 images in [0, 255], got {images.dtype}{hint}")
  if images.dtype != np.uint8 and images.size and (images.min() < 0 or images.max() > 255):
    raise ImageFormatError(
        f"{what}: values in [{images.min()}, {images.max()}] are outside [0, 255]")
  images = images.astype(np.uint8, copy=False)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


class FeatureExtractor:
  """Jitted Inception features, sharded over a 1-D mesh of devices on the batch axis.

  Each batch is padded up to a fixed size (a multiple of the device count) so that the
  function compiles once per image size; padded rows are dropped from the output.
  """

  def __init__(self, model: inception.InceptionV3, variables, batch_size: int = 200,
               devices=None):
    devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.array(devices), ("batch",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self._data_sharding = NamedSharding(self.mesh, PartitionSpec("batch"))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.variables = jax.device_put(variables, replicated)
    self.with_logits = model.with_logits

    def forward(variables, images_uint8):
      return model.apply(variables, inception.preprocess(images_uint8))

    self._forward = jax.jit(forward, in_shardings=(replicated, self._data_sharding),
                            out_shardings=self._data_sharding)

  def _run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    count = len(batch)
    if count < self.batch_size:
      padding = np.zeros((self.batch_size - count,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, padding])
    batch = jax.device_put(batch, self._data_sharding)
    out = self._forward(self.variables, batch)
    return {k: np.asarray(v)[:count] for k, v in out.items()}

  def __call__(self, images: np.ndarray | Iterable[np.ndarray],
               max_images: int | None = None) -> dict[str, np.ndarray]:
    """Features of all images.

    Args:
      images: uint8 [N, H, W, C], or an iterable of such batches (e.g. a dataset pass).
      max_images: stop after this many images.

    Returns:
      {"pool": float32 [N, 2048]} plus "logits_unbiased" and "logits" [N, 1008] when the
      weights have the classifier, and "spatial" [N, 2023] (sFID) unless the model was built
      without it.
    """
    if isinstance(images, np.ndarray):
      images = _batches(check_images(images), self.batch_size)
    outputs, seen = [], 0
    for batch in images:
      batch = check_images(batch)
      if max_images is not None:
        batch = batch[:max_images - seen]
      for chunk in _batches(batch, self.batch_size):
        outputs.append(self._run_batch(chunk))
      seen += len(batch)
      if max_images is not None and seen >= max_images:
        break
    if not outputs:
      raise ImageFormatError("no images to compute features of")
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
