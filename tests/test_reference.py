"""jaxdiff.eval.reference: samples/reference .npz files and cached statistics."""
import numpy as np
import pytest

from jaxdiff.eval import features
from jaxdiff.eval import reference


def test_samples_metadata_and_images(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  path = tmp_path / "s.npz"
  np.savez(path, arr_0=images, arr_1=np.arange(3), method=np.array("ddim"),
           num_steps=np.array(50), guidance_scale=np.array(1.5), seed=np.array(7))
  got, metadata = reference.load_samples(str(path))
  np.testing.assert_array_equal(got, images)
  assert metadata == {"method": "ddim", "num_steps": 50, "guidance_scale": 1.5, "seed": 7}


def test_npz_without_images(tmp_path):
  path = tmp_path / "s.npz"
  np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(reference.ReferenceFileError, match="no 'arr_0'"):
    reference.load_samples(str(path))
  with pytest.raises(reference.ReferenceFileError, match="neither images"):
    reference.load_reference(str(path), None)


def test_float_samples_are_refused(tmp_path):
  path = tmp_path / "s.npz"
  np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(features.ImageFormatError, match="float32"):
    reference.load_samples(str(path))


def test_missing_file(tmp_path):
  with pytest.raises(reference.ReferenceFileError, match="not found"):
    reference.load_samples(str(tmp_path / "nope.npz"))


def test_statistics_round_trip(tmp_path):
  pool = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
  stats = reference.statistics_from_features(pool)
  np.testing.assert_allclose(stats["mu"], pool.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats["sigma"], np.cov(pool.astype(np.float64).T), rtol=1e-12)
  path = str(tmp_path / "stats.npz")
  reference.save_statistics(path, stats)
  loaded = reference.load_reference(path, None)
  assert loaded["num_images"] == 30
  np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
  np.testing.assert_array_equal(loaded["features"], pool)
