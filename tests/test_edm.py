"""EDM against closed forms and a float64 NumPy implementation of Algorithm 2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import edm, samplers

MU, STD = 0.5, 0.3


def gaussian_denoiser(x, sigma):
  """E[x_0 | x] for x_0 ~ N(MU, STD²), x = x_0 + σ n."""
  s2 = sigma[:, None, None, None]**2
  return MU + STD**2 / (STD**2 + s2) * (x - MU)


def reference_algorithm_2(x_T, noises, num_steps, s_churn, s_min, s_max, s_noise,
                          sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """Karras et al. 2022, Algorithm 2, in float64 NumPy, with the given churn noise per step."""
  i = np.arange(num_steps)
  inverse_max, inverse_min = sigma_max**(1 / rho), sigma_min**(1 / rho)
  t = (inverse_max + i / (num_steps - 1) * (inverse_min - inverse_max))**rho
  t = np.append(t, 0.0)
  denoise = lambda x, s: MU + STD**2 / (STD**2 + s**2) * (x - MU)
  x = x_T.astype(np.float64) * t[0]
  for k in range(num_steps):
    gamma = min(s_churn / num_steps, np.sqrt(2) - 1) if s_min <= t[k] <= s_max else 0.0
    t_hat = t[k] + gamma * t[k]
    x_hat = x + np.sqrt(t_hat**2 - t[k]**2) * s_noise * noises[k]
    d = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x = x_hat + (t[k + 1] - t_hat) * d
    if t[k + 1] != 0:
      d_next = (x - denoise(x, t[k + 1])) / t[k + 1]
      x = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * d_next)
  return x


@pytest.mark.parametrize("s_churn, s_min, s_max", [(0.0, 0.0, np.inf), (40.0, 0.05, 50.0)])
def test_sampler_matches_algorithm_2(s_churn, s_min, s_max):
  x_T = np.random.default_rng(0).standard_normal((2, 4, 4, 1)).astype(np.float32)
  key = jax.random.key(4)
  keys = samplers.example_keys(key, 2)
  noises = [np.asarray(samplers.step_noise(keys, k, x_T.shape), np.float64) for k in range(18)]
  got = edm.sample_edm(gaussian_denoiser, x_T, key, num_steps=18, s_churn=s_churn, s_min=s_min,
                       s_max=s_max, s_noise=1.007)
  expected = reference_algorithm_2(x_T, noises, 18, s_churn, s_min, s_max, 1.007)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_deterministic_sampler_recovers_the_gaussian():
  """Converges to N(MU, STD²) with N (std 0.319 at N = 18, 0.303 at 40, 0.301 at 80)."""
  x_T = jax.random.normal(jax.random.key(0), (128, 8, 4, 1))
  x_T = (x_T - x_T.mean()) / x_T.std()
  x = np.asarray(edm.sample_edm(gaussian_denoiser, x_T, jax.random.key(1), num_steps=40))
  assert abs(x.mean() - MU) < 0.005 and abs(x.std() - STD) < 0.005


def test_sigmas_are_rho_spaced():
  sigmas = edm.edm_sigmas(18)
  assert sigmas[0] == pytest.approx(80.0) and sigmas[17] == pytest.approx(0.002) and sigmas[18] == 0
  inverse = sigmas[:-1].astype(np.float64)**(1 / 7)
  np.testing.assert_allclose(np.diff(inverse), np.diff(inverse)[0], rtol=1e-4)


def test_preconditioning_closed_forms():
  sigma = jnp.array([0.01, 0.5, 80.0])
  c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
  s, d = np.array([0.01, 0.5, 80.0]), 0.5
  np.testing.assert_allclose(c_skip, d**2 / (s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * d / np.sqrt(s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + d**2), rtol=1e-6)
  np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
  # λ(σ) c_out(σ)² = 1: the network's effective loss weight is uniform (EDM sec. 5).
  np.testing.assert_allclose(edm.loss_weight(sigma) * c_out**2, 1.0, rtol=1e-5)
  # x has unit variance at the network input when x_0 has variance σ_d² (c_in's purpose).
  np.testing.assert_allclose(c_in**2 * (d**2 + s**2), 1.0, rtol=1e-5)


def test_precondition_wraps_the_network():
  calls = []

  def network(x, c_noise):
    calls.append((np.asarray(x), np.asarray(c_noise)))
    return 2.0 * x

  x, sigma = jnp.full((2, 2, 2, 1), 3.0), jnp.array([0.5, 2.0])
  out = edm.precondition(network)(x, sigma)
  c_skip, c_out, c_in, _ = [np.asarray(c)[:, None, None, None]
                            for c in edm.preconditioning(sigma)]
  np.testing.assert_allclose(out, np.broadcast_to(c_skip * 3.0 + c_out * 2.0 * c_in * 3.0, x.shape),
                             rtol=1e-6)
  np.testing.assert_allclose(calls[0][1], np.log([0.5, 2.0]) / 4, rtol=1e-6)


def test_training_inputs_and_loss():
  keys = jax.random.split(jax.random.key(0), 8192)
  sigma, noise = edm.edm_training_inputs(keys, jnp.zeros((8192, 1)))
  log_sigma = np.log(np.asarray(sigma, np.float64))
  assert abs(log_sigma.mean() + 1.2) < 0.04 and abs(log_sigma.std() - 1.2) < 0.04
  rng = np.random.default_rng(1)
  x0, n = rng.standard_normal((3, 4, 4, 1)), rng.standard_normal((3, 4, 4, 1))
  s = np.array([0.1, 1.0, 10.0])
  loss, aux = edm.edm_loss(lambda x, sig: 0.5 * x, jnp.asarray(x0, jnp.float32),
                           jnp.asarray(s, jnp.float32), jnp.asarray(n, jnp.float32))
  x = x0 + s[:, None, None, None] * n
  simple = ((0.5 * x - x0)**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(aux["loss_simple"], simple, rtol=1e-5)
  np.testing.assert_allclose(loss, (s**2 + 0.25) / (s * 0.5)**2 * simple, rtol=1e-5)
