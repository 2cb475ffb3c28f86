"""jaxdiff.eval.evaluator: sFID (ADM's spatial features) on ADM-layout reference batches."""
import numpy as np
import pytest

import fidelity_reference
from jaxdiff.eval import evaluator
from jaxdiff.eval import features as features_lib
from jaxdiff.eval import reference
from jaxdiff.eval import weights


def _frechet_closed_form(x1: np.ndarray, x2: np.ndarray) -> float:
  """FID of two feature sets with n < D in closed form: with centred X1, X2 [n, D],
  tr((S1 S2)^(1/2)) is the sum of singular values of X1 X2^T / (n - 1)."""
  x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  n = len(x1)
  trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / (n - 1)
  return float(np.sum((x1.mean(0) - x2.mean(0))**2)
               + (np.sum(c1**2) + np.sum(c2**2)) / (n - 1) - 2 * trace_sqrt)


class _FixedFeatures:
  """Stands in for the Inception network: returns given features, checking the image count."""

  def __init__(self, features: dict):
    self.features = features

  def __call__(self, images):
    assert len(images) == len(self.features["pool"])
    return self.features


def _random_features(seed: int, n: int = 12, offset: float = 0.0) -> dict:
  """Small stand-ins for the [n, 2048] pool and [n, 2023] spatial features (same code path)."""
  rng = np.random.default_rng(seed)
  return {"pool": rng.standard_normal((n, 48)) + offset,
          "spatial": np.abs(rng.standard_normal((n, 40))) + offset}


def test_sfid_from_an_adm_reference_batch_matches_closed_form(tmp_path):
  ref_features, sample_features = _random_features(0), _random_features(1, offset=0.3)
  # ADM's VIRTUAL_imagenet256_labeled.npz layout: images plus TF-computed statistics, which are
  # ignored in favour of the images (these are deliberately wrong).
  adm_path = tmp_path / "VIRTUAL_adm_layout.npz"
  np.savez(adm_path, arr_0=np.zeros((12, 8, 8, 3), np.uint8), arr_1=np.arange(12),
           mu=np.zeros(48), sigma=np.eye(48), mu_s=np.zeros(40), sigma_s=np.eye(40))
  ref = reference.load_reference(str(adm_path), _FixedFeatures(ref_features))
  got = evaluator.compute_metrics(sample_features, ref, names=("fid", "sfid"))
  assert got["sfid"] == pytest.approx(
      _frechet_closed_form(sample_features["spatial"], ref_features["spatial"]), rel=1e-6)
  assert got["fid"] == pytest.approx(
      _frechet_closed_form(sample_features["pool"], ref_features["pool"]), rel=1e-6)
  assert got["sfid"] > 1.0 and got["sfid_label"] == "sFID-12 (proxy)"

  # Cached statistics in ADM's names (no images): mu_s / sigma_s are read and used.
  stats_path = str(tmp_path / "stats.npz")
  reference.save_statistics(stats_path, ref)
  cached = reference.load_reference(stats_path, None)
  again = evaluator.compute_metrics(sample_features, cached, names=("sfid",))
  assert again["sfid"] == pytest.approx(got["sfid"], rel=1e-9)


def test_sfid_is_skipped_with_a_reason_without_spatial_statistics(tmp_path):
  path = tmp_path / "pool_only.npz"
  np.savez(path, mu=np.zeros(48), sigma=np.eye(48))
  result = evaluator.compute_metrics(_random_features(2), reference.load_reference(str(path), None),
                                     names=("sfid",))
  assert "sfid" not in result and "mu_s" in result["skipped"]["sfid"]
  no_spatial = {"pool": _random_features(3)["pool"]}
  result = evaluator.compute_metrics(no_spatial, {"mu_s": 0, "sigma_s": 0}, names=("sfid",))
  assert "spatial" in result["skipped"]["sfid"]
  assert "sfid" in evaluator.ALL_METRICS


@pytest.mark.slow
def test_sfid_end_to_end_matches_torch_fidelity_features(tmp_path):
  """The real path: Flax Inception features of an ADM-layout batch against torch-fidelity's
  network with a hook on Mixed_6d.branch1x1 (TF mixed_6/conv), first 7 channels, NHWC order."""
  path = fidelity_reference.random_inception_path()
  model, variables = weights.load_inception(path)
  extractor = features_lib.FeatureExtractor(model, variables, batch_size=12)
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  ref_images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
  ref_images[:, :16] //= 2  # a different distribution, so that sFID is far from 0
  adm_path = tmp_path / "VIRTUAL_adm_layout.npz"
  np.savez(adm_path, arr_0=ref_images, mu=np.zeros(2048), sigma=np.eye(2048),
           mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  ref = reference.load_reference(str(adm_path), extractor)
  got = evaluator.compute_metrics(extractor(samples), ref, names=("fid", "sfid"))
  want = fidelity_reference.reference_features(path, np.concatenate([samples, ref_images]))
  assert want["spatial"].shape == (24, 2023) and np.std(want["spatial"]) > 0.1
  assert got["sfid"] == pytest.approx(
      _frechet_closed_form(want["spatial"][:12], want["spatial"][12:]), rel=1e-4)
  assert got["fid"] == pytest.approx(
      _frechet_closed_form(want["pool"][:12], want["pool"][12:]), rel=1e-4)
