"""The variational bound against float64 NumPy / SciPy computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jaxdiff.diffusion import (
    bits_per_dim, discretized_gaussian_log_likelihood, make_schedule, normal_kl)

T = 20
BETAS64 = np.linspace(1e-3, 0.3, T)
SCHEDULE = make_schedule("linear", T, beta_start=1e-3, beta_end=0.3)


def _reference_log_likelihood(x, mean, std):
  upper = np.where(x > 0.999, np.inf, x + 1 / 255)
  lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
  prob = scipy.stats.norm.cdf(upper, mean, std) - scipy.stats.norm.cdf(lower, mean, std)
  return np.log(np.maximum(prob, 1e-12))


def test_discretized_gaussian_matches_scipy_and_normalises():
  bins = np.arange(256) / 127.5 - 1
  for mean, std in [(0.1, 0.05), (-0.97, 0.01), (0.999, 0.003), (0.3, 1.5)]:
    got = discretized_gaussian_log_likelihood(
        jnp.asarray(bins, jnp.float32), jnp.float32(mean), jnp.float32(math.log(std)))
    expected = _reference_log_likelihood(bins, mean, std)
    near = expected > -20  # Where float32 CDF differences still carry digits.
    np.testing.assert_allclose(np.asarray(got)[near], expected[near], rtol=1e-3, atol=1e-4)
    assert abs(np.exp(np.asarray(got, np.float64)).sum() - 1) < 1e-4


def test_normal_kl_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=10), rng.normal(size=10)
  s1, s2 = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  got = normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, 2 * np.log(s1), m2, 2 * np.log(s2))))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _model(x, t):
  return jnp.tanh(0.9 * x - t.astype(jnp.float32)[:, None, None, None] / T)


def _reference_bpd(x0, key):
  """The DDPM bound in float64 with ε-prediction and the fixed-small variance."""
  alpha_bar = np.cumprod(1 - BETAS64)
  prev = np.append(1.0, alpha_bar[:-1])
  posterior_var = BETAS64 * (1 - prev) / (1 - alpha_bar)
  log_var_clipped = np.log(np.append(posterior_var[1], posterior_var[1:]))
  draw = jax.jit(jax.vmap(jax.vmap(  # The sampler's convention: fold_in(fold_in(key, i), t).
      lambda i, t: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), t),
                                     x0.shape[1:]), (None, 0)), (0, None)))
  all_noise = np.asarray(draw(jnp.arange(x0.shape[0]), jnp.arange(T)), np.float64)
  prior = 0.5 * (alpha_bar[-1] * x0**2 + (1 - alpha_bar[-1]) - 1 - np.log(1 - alpha_bar[-1]))
  total = prior.mean(axis=(1, 2, 3)) / math.log(2)
  for t in range(T):
    noise = all_noise[:, t]
    x_t = np.sqrt(alpha_bar[t]) * x0 + np.sqrt(1 - alpha_bar[t]) * noise
    eps = np.tanh(0.9 * x_t - t / T)
    x0_hat = (x_t - np.sqrt(1 - alpha_bar[t]) * eps) / np.sqrt(alpha_bar[t])
    coef1 = BETAS64[t] * np.sqrt(prev[t]) / (1 - alpha_bar[t])
    coef2 = (1 - prev[t]) * np.sqrt(1 - BETAS64[t]) / (1 - alpha_bar[t])
    model_mean = coef1 * x0_hat + coef2 * x_t
    var = math.exp(log_var_clipped[t])
    if t == 0:
      term = -_reference_log_likelihood(x0, model_mean, math.sqrt(var))
    else:
      true_mean = coef1 * x0 + coef2 * x_t
      term = 0.5 * (posterior_var[t] / var + (true_mean - model_mean)**2 / var - 1
                    + np.log(var / posterior_var[t]))
    total += term.mean(axis=(1, 2, 3)) / math.log(2)
  return total


def test_bits_per_dim_matches_float64_reference():
  rng = np.random.default_rng(1)
  x0 = rng.integers(0, 256, (3, 4, 4, 1)) / 127.5 - 1
  key = jax.random.key(4)
  got = bits_per_dim(_model, SCHEDULE, jnp.asarray(x0, jnp.float32), key)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, _reference_bpd(x0, key), rtol=1e-4)
