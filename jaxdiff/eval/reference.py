"""Sample and reference files: image `.npz` batches, cached statistics, dataset statistics.

An images `.npz` holds `arr_0`: uint8 [N, H, W, C] (ADM's reference batches and the sample
CLI's output); a samples file may also carry scalar metadata (`method`, `num_steps`,
`guidance_scale`, `seed`, `checkpoint_step`, ...). A statistics `.npz` holds `mu` [2048],
`sigma` [2048, 2048], `num_images`, optionally `features` [N, 2048] for KID and
precision/recall, and `mu_s` [2023], `sigma_s` [2023, 2023] of the spatial features for sFID
(ADM's names). When a file has both `arr_0` and `mu` (ADM's reference batches, e.g.
VIRTUAL_imagenet256_labeled.npz, carry TF-computed `mu`, `sigma`, `mu_s`, `sigma_s`), the
images are used, so every number comes from this network.
"""
import os
from typing import Any

import numpy as np

from jaxdiff.eval import features as features_lib
from jaxdiff.eval import metrics


class ReferenceFileError(ValueError):
  """A samples or reference file is unusable."""


def _open_npz(path: str):
  if not os.path.isfile(path):
    raise ReferenceFileError(f"file not found: {path}")
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ReferenceFileError(f"{path}: not a readable .npz file ({e})") from e


def _scalar(value: np.ndarray) -> Any:
  item = value.item()
  return item.decode() if isinstance(item, bytes) else item


def load_samples(path: str) -> tuple[np.ndarray, dict]:
  """Reads a samples `.npz`.

  Returns:
    images: uint8 [N, H, W, 3]; metadata: {key: python scalar} for every 0-d entry.

  Raises:
    ReferenceFileError: no `arr_0`; features.ImageFormatError: bad dtype, range or shape.
  """
  with _open_npz(path) as data:
    if "arr_0" not in data.files:
      raise ReferenceFileError(
          f"{path}: no 'arr_0' array (expected uint8 images [N, H, W, C]); keys: {data.files}")
    images = features_lib.check_images(data["arr_0"], what=f"{path} arr_0")
    metadata = {k: _scalar(data[k]) for k in data.files if k != "arr_0" and data[k].ndim == 0}
  return images, metadata


def load_reference(path: str, extractor: "features_lib.FeatureExtractor | None") -> dict:
  """Reads a reference `.npz` of images or of cached statistics.

  Args:
    path: the file.
    extractor: computes features when the file holds images (may be None for statistics).

  Returns:
    {"mu", "sigma", "num_images"}, "features" [N, 2048] when available, and "mu_s", "sigma_s"
    (spatial statistics for sFID) when the images or the file provide them.
  """
  with _open_npz(path) as data:
    if "arr_0" in data.files:
      images = features_lib.check_images(data["arr_0"], what=f"{path} arr_0")
      features = extractor(images)
      return statistics_from_features(features["pool"], features.get("spatial"))
    if "mu" in data.files and "sigma" in data.files:
      stats = {"mu": data["mu"].astype(np.float64), "sigma": data["sigma"].astype(np.float64)}
      if "mu_s" in data.files and "sigma_s" in data.files:
        stats["mu_s"] = data["mu_s"].astype(np.float64)
        stats["sigma_s"] = data["sigma_s"].astype(np.float64)
      if "features" in data.files:
        stats["features"] = data["features"]
      num = data["num_images"] if "num_images" in data.files else None
      stats["num_images"] = int(num) if num is not None else (
          len(stats["features"]) if "features" in stats else None)
      return stats
    raise ReferenceFileError(
        f"{path}: neither images ('arr_0') nor statistics ('mu' and 'sigma'); keys: {data.files}")


def statistics_from_features(pool: np.ndarray, spatial: np.ndarray | None = None) -> dict:
  """{"mu", "sigma", "num_images", "features"} from pool features [N, 2048], plus
  {"mu_s", "sigma_s"} from spatial features [N, 2023] when given (the features themselves are
  not kept: only sFID uses them)."""
  mu, sigma = metrics.fid_statistics(pool)
  stats = {"mu": mu, "sigma": sigma, "num_images": len(pool), "features": pool}
  if spatial is not None:
    stats["mu_s"], stats["sigma_s"] = metrics.fid_statistics(spatial)
  return stats


def save_statistics(path: str, stats: dict) -> None:
  """Writes statistics (with features when present) as `.npz`, atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in stats.items() if v is not None})
  os.replace(tmp, path)


def dataset_statistics(name: str, split: str, extractor, cache_dir: str, *,
                       image_size: int = 32, data_dir: str | None = None,
                       batch_size: int = 500, max_images: int | None = None) -> tuple[dict, str]:
  """Statistics of a TFDS dataset split, computed once and cached as `.npz`.

  Uses `jaxdiff.data.iterate_dataset` (imported here so that evaluating `.npz` files does not
  need the data stack).

  Returns:
    (statistics dict as `load_reference`, cache path).
  """
  suffix = f"_{max_images}" if max_images else ""
  path = os.path.join(cache_dir, f"{name}_{split}_{image_size}px{suffix}_inception_stats.npz")
  if os.path.isfile(path):
    return load_reference(path, None), path
  from jaxdiff import data  # pylint: disable=g-import-not-at-top
  config = data.DataConfig(source="tfds", name=name, split=split, image_size=image_size,
                           data_dir=data_dir)
  batches = (batch["image"] for batch in
             data.iterate_dataset(config, batch_size=batch_size, split=split,
                                  max_examples=max_images))
  features = extractor(batches, max_images=max_images)
  stats = statistics_from_features(features["pool"], features.get("spatial"))
  save_statistics(path, stats)
  return stats, path
