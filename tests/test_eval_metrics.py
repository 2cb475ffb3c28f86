"""jaxdiff.eval.metrics against closed forms, scipy, naive float64 loops and torch-fidelity."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

import fidelity_reference
from jaxdiff.eval import metrics

ref = fidelity_reference.reference


def test_fid_of_a_set_with_itself_is_zero():
  features = np.random.default_rng(0).normal(size=(200, 16)) * 3.0 + 1.0
  assert abs(metrics.fid_from_features(features, features)) < 1e-8


def test_fid_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_fid_commuting_covariances_closed_form():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  lam1, lam2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
  sigma1, sigma2 = q @ np.diag(lam1) @ q.T, q @ np.diag(lam2) @ q.T
  mu = rng.normal(size=5)
  expected = np.sum((np.sqrt(lam1) - np.sqrt(lam2)) ** 2)
  assert metrics.frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(expected, rel=1e-9)


def test_fid_general_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
  sigma1, sigma2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
  assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_features_matches_torch_fidelity():
  rng = np.random.default_rng(4)
  f1 = rng.normal(size=(300, 12)).astype(np.float32)
  f2 = (rng.normal(size=(250, 12)) * 1.3 + 0.2).astype(np.float32)
  stats = [ref.fid.fid_features_to_statistics(torch.from_numpy(f)) for f in (f1, f2)]
  expected = ref.fid.fid_statistics_to_metric(*stats, verbose=False)
  got = metrics.fid_from_features(f1, f2)
  assert got == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)


def _naive_mmd2_unbiased(x, y):
  m, d = len(x), x.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1.0) ** 3
  same = sum(k(x[i], x[j]) + k(y[i], y[j])
             for i, j in itertools.product(range(m), repeat=2) if i != j)
  cross = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2))
  return same / (m * (m - 1)) - 2.0 * cross / (m * m)


def test_kid_matches_naive_unbiased_mmd():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.5
  # One subset holding every point: the estimate is invariant to the order drawn.
  got = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=5)
  assert got["kid_mean"] == pytest.approx(_naive_mmd2_unbiased(x, y), rel=1e-12)
  assert got["kid_std"] == 0.0 and got["kid_subset_size"] == 5


def test_kid_subsets_match_torch_fidelity():
  rng = np.random.default_rng(6)
  f1 = rng.normal(size=(30, 8)).astype(np.float32)
  f2 = (rng.normal(size=(40, 8)) + 0.3).astype(np.float32)
  expected = ref.kid.kid_features_to_metric(
      torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7, kid_subset_size=12,
      verbose=False)
  got = metrics.kernel_inception_distance(f1, f2, num_subsets=7, subset_size=12)
  assert got["kid_mean"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-4)
  assert got["kid_std"] == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-4)


def test_inception_score_hand_computation():
  logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [-1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  marginal = p.mean(axis=0)
  expected = np.exp(np.mean([np.sum(pi * np.log(pi / marginal)) for pi in p]))
  got = metrics.inception_score(logits, splits=1, shuffle=False)
  assert got["inception_score_mean"] == pytest.approx(expected, rel=1e-12)
  assert got["inception_score_std"] == 0.0


def test_inception_score_limits():
  uniform = metrics.inception_score(np.zeros((10, 7)), splits=1)
  assert uniform["inception_score_mean"] == pytest.approx(1.0, abs=1e-12)
  confident = metrics.inception_score(np.eye(5) * 100.0, splits=1)  # 5 distinct sure classes.
  assert confident["inception_score_mean"] == pytest.approx(5.0, rel=1e-9)


def test_inception_score_splits_match_torch_fidelity():
  logits = np.random.default_rng(7).normal(size=(53, 20)).astype(np.float32) * 3
  expected = ref.isc.isc_features_to_metric(torch.from_numpy(logits), splits=4)
  got = metrics.inception_score(logits, splits=4)
  assert got["inception_score_mean"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)
  assert got["inception_score_std"] == pytest.approx(expected["inception_score_std"], rel=1e-5)


def test_precision_recall_identical_and_disjoint_sets():
  points = np.random.default_rng(8).normal(size=(20, 4))
  assert metrics.precision_recall(points, points) == {"precision": 1.0, "recall": 1.0}
  assert metrics.precision_recall(points, points + 1000.0) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_hand_case():
  # Real points on a line at 0, 1, 2, 3, 10: their 3rd-neighbour radii are 3, 2, 2, 3, 9, so the
  # real manifold is [-3, 6] u [1, 19]. Generated -3.5 and 20 lie outside, 5 and 18.5 inside.
  # Generated radii (23.5, 15, 22, 23.5) cover every real point.
  line = lambda xs: np.stack([np.asarray(xs, float), np.zeros(len(xs))], axis=1)
  real, fake = line([0, 1, 2, 3, 10]), line([20, -3.5, 5, 18.5])
  assert metrics.precision_recall(real, fake) == {"precision": 0.5, "recall": 1.0}
  # Swapping the roles swaps precision and recall.
  swapped = metrics.precision_recall(fake, real)
  assert swapped == {"precision": 1.0, "recall": 0.5}


def test_precision_recall_matches_torch_fidelity():
  rng = np.random.default_rng(9)
  real = rng.normal(size=(60, 6)).astype(np.float32)
  fake = (rng.normal(size=(50, 6)) * 1.4 + 0.4).astype(np.float32)
  precision, recall = ref.prc.calculate_precision_recall_full(
      torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3)
  got = metrics.precision_recall(real, fake, k=3, block_size=16)
  # torch-fidelity averages in float32; one point more or less would move a score by >= 1/60.
  assert got == pytest.approx({"precision": precision, "recall": recall}, abs=1e-6)
  assert 0.0 < got["precision"] < 1.0 and 0.0 < got["recall"] <= 1.0
