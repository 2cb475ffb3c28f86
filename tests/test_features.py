"""jaxdiff.eval.features: sharded, padded extraction against torch-fidelity; input checks."""
import jax
import numpy as np
import pytest

import fidelity_reference
from jaxdiff.eval import features
from jaxdiff.eval import weights


def test_sharded_padded_features_match_torch_fidelity():
  path = fidelity_reference.random_inception_path()
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  expected = fidelity_reference.reference_features(path, images)
  assert len(jax.devices()) == 4
  extractor = features.FeatureExtractor(*weights.load_inception(path), batch_size=4)
  got = extractor(images)  # Batches of 4 and 1 (padded to 4), each split over 4 devices.
  for name, want in expected.items():
    np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=name)
  streamed = extractor(iter([images[:2], images[2:]]), max_images=2)
  np.testing.assert_allclose(streamed["pool"], got["pool"][:2], rtol=1e-6,
                             atol=1e-6 * np.abs(got["pool"]).max())


def test_check_images_accepts_integer_and_grayscale():
  gray = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.int64)
  out = features.check_images(gray)
  assert out.dtype == np.uint8 and out.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(out[..., 2], gray[..., 0])


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "to_uint8"),
    (np.full((2, 8, 8, 3), 300, np.int32), r"outside \[0, 255\]"),
    (np.full((2, 8, 8, 3), -1, np.int16), r"outside \[0, 255\]"),
    (np.zeros((2, 3, 8, 8), np.uint8), "NHWC"),
    (np.zeros((8, 8, 3), np.uint8), "NHWC"),
])
def test_check_images_rejects(images, message):
  with pytest.raises(features.ImageFormatError, match=message):
    features.check_images(images)
