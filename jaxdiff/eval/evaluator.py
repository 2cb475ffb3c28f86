"""Scores of generated images against reference statistics, for the CLI and the train loop.

Every score is reported with its sample count; FID from fewer than 10,000 samples is labelled
a proxy ("FID-5000 (proxy)"), since FID is biased upwards at small N and not comparable with
papers' FID-50k.
"""
import numpy as np

from jaxdiff.eval import features as features_lib
from jaxdiff.eval import metrics as metrics_lib
from jaxdiff.eval import reference as reference_lib
from jaxdiff.eval import weights

PROXY_BELOW = 10_000
ALL_METRICS = ("fid", "sfid", "kid", "is", "pr")


def fid_label(num_samples: int, name: str = "FID") -> str:
  """'FID-<n>' (or '<name>-<n>'), with ' (proxy)' below 10,000 samples."""
  return f"{name}-{num_samples}" + (" (proxy)" if num_samples < PROXY_BELOW else "")


def _needs_reference_features(reference: dict, name: str, skipped: dict) -> bool:
  if reference.get("features") is None:
    skipped[name] = "the reference has statistics but no features"
    return False
  return True


def compute_metrics(sample_features: dict, reference: dict, names=ALL_METRICS,
                    kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
  """Scores generated images' features against a reference.

  Args:
    sample_features: from `FeatureExtractor`: "pool" [N, 2048], optionally "logits_unbiased"
      and "spatial" [N, 2023].
    reference: from `reference.load_reference`: "mu", "sigma", optionally "features", "mu_s"
      and "sigma_s".
    names: any of "fid", "sfid" (ADM's spatial FID), "kid", "is" (Inception Score), "pr"
      (precision/recall, k = 3).

  Returns:
    {"num_samples", and per metric "fid", "fid_label", "sfid", "sfid_label", "kid_mean",
    "kid_std", "kid_subset_size", "inception_score_mean", "inception_score_std", "precision",
    "recall"},
    plus "skipped": {metric: reason} for metrics the inputs do not allow.
  """
  unknown = set(names) - set(ALL_METRICS)
  if unknown:
    raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
  pool = sample_features["pool"]
  results, skipped = {"num_samples": len(pool)}, {}
  if "fid" in names:
    mu, sigma = metrics_lib.fid_statistics(pool)
    results["fid"] = metrics_lib.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    results["fid_label"] = fid_label(len(pool))
  if "sfid" in names:
    results.update(_spatial_fid(sample_features, reference, skipped))
  if "kid" in names and _needs_reference_features(reference, "kid", skipped):
    # Generated first, reference second: the order torch-fidelity draws its subsets in.
    results.update(metrics_lib.kernel_inception_distance(
        pool, reference["features"], kid_subsets, kid_subset_size))
  if "is" in names:
    if "logits_unbiased" in sample_features:
      results.update(metrics_lib.inception_score(sample_features["logits_unbiased"]))
    else:
      skipped["is"] = "the Inception weights have no classifier (fc)"
  if "pr" in names and _needs_reference_features(reference, "pr", skipped):
    results.update(metrics_lib.precision_recall(reference["features"], pool))
  if skipped:
    results["skipped"] = skipped
  return results


def _spatial_fid(sample_features: dict, reference: dict, skipped: dict) -> dict:
  """sFID (Nash et al. 2021, as ADM computes it): the Fréchet distance of the spatial features."""
  if "spatial" not in sample_features:
    skipped["sfid"] = "the Inception network was built without spatial features"
    return {}
  if reference.get("mu_s") is None or reference.get("sigma_s") is None:
    skipped["sfid"] = "the reference has no spatial statistics (mu_s, sigma_s)"
    return {}
  mu, sigma = metrics_lib.fid_statistics(sample_features["spatial"])
  sfid = metrics_lib.frechet_distance(mu, sigma, reference["mu_s"], reference["sigma_s"])
  return {"sfid": sfid, "sfid_label": fid_label(len(sample_features["spatial"]), "sFID")}


class FidEvaluator:
  """Proxy FID (and friends) for a training loop: load the network and reference once.

  Example:
    evaluator = FidEvaluator(None, "stats/cifar10_train_inception_stats.npz")
    scores = evaluator.score(images_uint8)  # {"fid": ..., "fid_label": "FID-5000 (proxy)"}
  """

  def __init__(self, weights_path: str | None, reference_path: str, batch_size: int = 200,
               devices=None):
    """Args:
      weights_path: FID Inception `.pth`; None finds or downloads the standard file.
      reference_path: `.npz` of reference images (`arr_0`) or statistics (`mu`, `sigma`).
      batch_size: images per device step (rounded up to a multiple of the device count).
      devices: devices to shard over (default all).
    """
    model, variables = weights.load_inception(weights_path)
    self.extractor = features_lib.FeatureExtractor(model, variables, batch_size, devices)
    self.reference = reference_lib.load_reference(reference_path, self.extractor)

  def features(self, images_uint8: np.ndarray) -> dict:
    """uint8 [N, H, W, 3] -> {"pool": [N, 2048], ...}."""
    return self.extractor(images_uint8)

  def score(self, images_uint8: np.ndarray, names=("fid",)) -> dict:
    """Scores uint8 [N, H, W, 3] images; see `compute_metrics` for the keys."""
    return compute_metrics(self.features(images_uint8), self.reference, names)
