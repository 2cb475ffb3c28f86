"""Tests of jaxdiff.eval.digits: the classifier's held-out accuracy, the Fréchet distance's
ordering from real digits to noise, class coverage, and the cache."""
import numpy as np
import pytest

from jaxdiff.eval import digits
from jaxdiff.eval.metrics import fid_statistics, frechet_distance


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
  return digits.load_scorer(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def real():
  return digits.real_digits()


def test_held_out_split_is_100_per_class_and_disjoint(real):
  _, labels = real
  train, held = digits.held_out_split(labels)
  assert np.bincount(labels[held], minlength=10).tolist() == [100] * 10
  assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels) == 5000


def test_real_digits_are_padded_like_the_training_pipeline(real):
  images, _ = real
  assert images.shape == (5000, 32, 32, 1) and images.dtype == np.uint8
  assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0  # the 2-pixel zero border


def test_classifier_is_accurate_on_held_out_digits(scorer):
  # A small CNN on 4,000 MNIST digits reaches about 97-99% (LeCun et al. 1998 report 99% with
  # 60,000); below 95% its features would not be worth a distance.
  assert scorer.held_out_accuracy >= 0.95


def test_distance_orders_real_degraded_and_noise(scorer, real):
  images, labels = real
  _, held = digits.held_out_split(labels)
  rng = np.random.default_rng(0)
  clean = digits.score_digits(scorer, images[held])
  speckled = images[held].astype(np.float32) + rng.normal(0, 60, images[held].shape) * (
      rng.random(images[held].shape) < 0.3)
  speckled = digits.score_digits(scorer, np.clip(speckled, 0, 255).astype(np.uint8))
  noise = digits.score_digits(scorer, rng.integers(0, 256, (1000, 32, 32, 1), dtype=np.uint8))
  assert clean["frechet_distance"] == pytest.approx(scorer.held_out_distance, rel=1e-6)
  assert clean["frechet_distance"] < 0.5 * speckled["frechet_distance"]
  assert speckled["frechet_distance"] < noise["frechet_distance"]
  assert clean["class_coverage"] == 1.0 and clean["confident"] > 0.9


def test_coverage_and_shares_of_a_collapsed_generator(scorer, real):
  images, labels = real
  ones = images[labels == 1][:200]
  result = digits.score_digits(scorer, ones)
  assert result["class_coverage"] == pytest.approx(0.1)
  assert result["class_shares"][1] > 0.9 and sum(result["class_shares"]) == pytest.approx(1.0)


def test_distance_is_the_frechet_distance_of_the_features(scorer, real):
  images, _ = real
  sample = images[::7]
  _, features = digits.classify(scorer.params, sample)
  expected = frechet_distance(*fid_statistics(features), scorer.reference_mu,
                              scorer.reference_sigma)
  assert digits.score_digits(scorer, sample)["frechet_distance"] == pytest.approx(expected)


def test_rgb_samples_score_as_their_grey_average(scorer, real):
  images, _ = real
  grey = digits.score_digits(scorer, images[:300])
  rgb = digits.score_digits(scorer, np.repeat(images[:300], 3, axis=-1))
  assert rgb["frechet_distance"] == pytest.approx(grey["frechet_distance"], rel=1e-6)


def test_cache_returns_the_same_scorer(scorer, tmp_path_factory):
  cache = str(tmp_path_factory.getbasetemp() / "cache0")
  again = digits.load_scorer(cache)
  assert again.held_out_accuracy == scorer.held_out_accuracy
  np.testing.assert_array_equal(again.reference_mu, scorer.reference_mu)


def test_wrong_shape_is_refused(scorer):
  with pytest.raises(ValueError, match=r"\[N, 32, 32, 1 or 3\]"):
    digits.score_digits(scorer, np.zeros((4, 28, 28, 1), np.uint8))
