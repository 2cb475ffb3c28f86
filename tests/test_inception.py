"""jaxdiff.eval.inception against torch-fidelity's FeatureExtractorInceptionV3 (torch, CPU)."""
import jax
import numpy as np
import pytest
import torch

import fidelity_reference
from jaxdiff.eval import inception
from jaxdiff.eval import weights


@pytest.fixture(scope="module")
def random_weights():
  return fidelity_reference.random_inception_path()


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (299, 299), (400, 310)])
def test_resize_matches_torch_fidelity_tf1_bilinear(size):
  images = np.random.default_rng(0).uniform(0, 255, (2,) + size + (3,)).astype(np.float32)
  expected = fidelity_reference.reference.interpolate.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(299, 299), align_corners=False)
  got = inception.tf1_resize_bilinear(jax.numpy.asarray(images), (299, 299))
  np.testing.assert_allclose(np.asarray(got), expected.numpy().transpose(0, 2, 3, 1),
                             rtol=0, atol=1e-4)


def test_resize_is_tf1_not_half_pixel():
  # TF1 samples output pixel i at source i * in / out: for 2 -> 4 pixels, 0, 0.5, 1, 1.5 (edge).
  row = jax.numpy.asarray([[[[0.0], [8.0]]]])
  got = np.asarray(inception.tf1_resize_bilinear(row, (1, 4)))[0, 0, :, 0]
  np.testing.assert_array_equal(got, [0.0, 4.0, 8.0, 8.0])


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_features_match_torch_fidelity(random_weights, size):
  images = np.random.default_rng(size[1]).integers(0, 256, (2,) + size + (3,), dtype=np.uint8)
  expected = fidelity_reference.reference_features(random_weights, images)
  model, variables = weights.load_inception(random_weights)
  got = jax.jit(lambda v, x: model.apply(v, inception.preprocess(x)))(variables, images)
  assert set(got) == {"pool", "logits_unbiased", "logits", "spatial"}
  assert got["spatial"].shape == (2, 17 * 17 * inception.SPATIAL_CHANNELS)  # ADM's 2023 dims
  for name, want in expected.items():
    assert np.std(want) > 1.0, name  # The random network must not collapse to constants.
    np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max(), err_msg=name)
