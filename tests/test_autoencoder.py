"""jaxdiff.models.autoencoder: shapes, precision, chunked decoding, posterior helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import autoencoder as ae


@pytest.fixture(scope="module")
def tiny():
  model = ae.build_autoencoder("kl-tiny")
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)), jnp.float32)
  # Random parameters of the module's shapes, drawn in NumPy (compiling `init`'s random
  # initialisers takes far longer than the tests); norm scales around 1, nothing zero.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return noise + np.float32(jax.tree_util.keystr(path).endswith("'scale']"))

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return model, params, x


def test_reconstruction_chunked_decoding_and_bfloat16(tiny):
  model, params, x = tiny
  image, mean, logvar = jax.jit(model.apply)({"params": params}, x)  # z = posterior mean
  assert mean.shape == logvar.shape == (5, 8, 8, 4) and mean.dtype == jnp.float32
  assert image.shape == (5, 16, 16, 3) and image.dtype == jnp.float32
  before = ae._decode_chunk._cache_size()
  chunked = ae.decode_in_chunks(model, params, np.asarray(mean), chunk_size=2)  # 2 + 2 + 1 pad
  assert ae._decode_chunk._cache_size() - before == 1  # one compilation for all chunks
  assert isinstance(chunked, np.ndarray) and chunked.shape == (5, 16, 16, 3)
  np.testing.assert_allclose(chunked, image, rtol=1e-5, atol=1e-5)
  half = ae.decode_in_chunks(model.clone(dtype=jnp.bfloat16), params, mean, chunk_size=5)
  assert half.dtype == np.float32
  error = float(np.abs(half - image).max() / np.abs(image).max())
  assert 0 < error < 5e-2  # bf16 really computes in bf16, and stays close
  with pytest.raises(ValueError, match="chunk_size"):
    ae.decode_in_chunks(model, params, mean, chunk_size=0)


def test_posterior_helpers_against_numpy():
  rng = np.random.default_rng(2)
  mean = rng.standard_normal((3, 2, 2, 4))
  logvar = rng.uniform(-3, 1, (3, 2, 2, 4))
  expected = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(3, -1).sum(1)
  np.testing.assert_allclose(ae.kl_divergence(jnp.asarray(mean, jnp.float32),
                                              jnp.asarray(logvar, jnp.float32)),
                             expected, rtol=1e-5)
  key = jax.random.key(3)
  z = ae.sample_posterior(key, jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  np.testing.assert_allclose(z, mean + np.exp(logvar / 2) * eps, rtol=1e-5, atol=1e-6)
  model = ae.AutoencoderKL(scaling_factor=0.5, shift_factor=0.1)
  np.testing.assert_allclose(ae.scale_latents(model, jnp.float32(1.1)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(ae.unscale_latents(model, ae.scale_latents(model, z)), z,
                             rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_problem(tiny):
  model, params, _ = tiny
  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply({"params": params}, jnp.zeros((1, 15, 16, 3)), method=model.encode)
  with pytest.raises(ValueError, match="latents"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), method=model.decode)
  with pytest.raises(ValueError, match="norm_groups"):
    ae.build_autoencoder("kl-tiny", norm_groups=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="kl-f8"):
    ae.build_autoencoder("kl-f16")
  with pytest.raises(ValueError, match="channels"):
    ae.build_autoencoder("kl-tiny", channels=3)


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_autoencoder_loss_against_float64_numpy(tiny, loss_type):
  """Reconstruction + KL per example, z_i drawn with key i, in float64 NumPy from the encoder's
  moments, the same normal draws and the decoder's output at those z."""
  model, params, x = tiny
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(5))
  kl_weight = 20.0  # large, so that the KL term shows in the total
  with jax.default_matmul_precision("highest"):
    loss, parts = jax.jit(lambda p, x, k: ae.autoencoder_loss(
        model.apply, p, x, k, loss_type=loss_type, kl_weight=kl_weight))(params, x, keys)
    mean, logvar = model.apply({"params": params}, x, method=model.encode)
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    eps = np.stack([np.asarray(jax.random.normal(k, mean.shape[1:])) for k in keys])
    z = mean + np.exp(0.5 * logvar) * eps.astype(np.float64)
    x_hat = np.asarray(model.apply({"params": params}, jnp.asarray(z, jnp.float32),
                                   method=model.decode), np.float64)
  error = x_hat - np.asarray(x, np.float64)
  per_pixel = np.abs(error) if loss_type == "l1" else error**2
  reconstruction = per_pixel.reshape(5, -1).mean(1)
  kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).reshape(5, -1).sum(1)
  np.testing.assert_allclose(parts["reconstruction"], reconstruction, rtol=1e-5)
  np.testing.assert_allclose(parts["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, reconstruction + kl_weight * kl / (16 * 16 * 3), rtol=1e-5)
  assert np.all(kl_weight * kl / (16 * 16 * 3) > 0.01 * reconstruction)
  with pytest.raises(ValueError, match="huber"):
    ae.autoencoder_loss(model.apply, params, x, keys, loss_type="huber")
