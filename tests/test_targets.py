"""q_sample statistics and the ε / x0 / v / score conversions against float64 closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jaxdiff.diffusion import (
    eps_from_score, eps_from_v, eps_from_x0, make_schedule, prediction_target, q_sample,
    score_from_eps, v_from_x0_eps, x0_and_eps, x0_from_eps, x0_from_v)

SCHEDULE = make_schedule("linear", 1000)
ALPHA_BAR64 = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def _data(batch=6, seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (batch, 4, 4, 3)).astype(np.float32)
  eps = rng.standard_normal((batch, 4, 4, 3)).astype(np.float32)
  t = np.array([0, 1, 10, 500, 998, 999][:batch], np.int32)
  return x0, eps, t


def test_q_sample_matches_float64_and_diffusers():
  x0, eps, t = _data()
  x_t = q_sample(SCHEDULE, x0, t, eps)
  ab = ALPHA_BAR64[t][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5, atol=1e-6)
  ref = DDPMScheduler(num_train_timesteps=1000).add_noise(
      torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t).long())
  # diffusers accumulates ᾱ in float32 (~1e-6 drift); the float64 check above is the tight one.
  np.testing.assert_allclose(x_t, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_q_sample_statistics():
  x0 = np.full((20000, 1), 0.7, np.float32)
  t = np.full((20000,), 300, np.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = np.asarray(q_sample(SCHEDULE, x0, t, noise), np.float64)
  ab = ALPHA_BAR64[300]
  sem = np.sqrt(1 - ab) / np.sqrt(x0.size)
  assert abs(x_t.mean() - np.sqrt(ab) * 0.7) < 4 * sem
  assert abs(x_t.var() - (1 - ab)) < 4 * (1 - ab) * np.sqrt(2 / x0.size)


def test_v_target_and_inverse_formulas():
  x0, eps, t = _data()
  ab = ALPHA_BAR64[t][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
  alpha_bar = SCHEDULE.alphas_cumprod[t]
  np.testing.assert_allclose(v_from_x0_eps(x0, eps, alpha_bar), v, atol=2e-6)
  np.testing.assert_allclose(x0_from_v(x_t.astype(np.float32), v, alpha_bar), x0, atol=2e-5)
  np.testing.assert_allclose(eps_from_v(x_t.astype(np.float32), v, alpha_bar), eps, atol=2e-5)
  ref = DDPMScheduler(num_train_timesteps=1000).get_velocity(
      torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t).long())
  np.testing.assert_allclose(v_from_x0_eps(x0, eps, alpha_bar), ref.numpy(), atol=2e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_round_trip_through_every_prediction(prediction):
  x0, eps, t = _data()
  t = np.minimum(t, 990)  # x0 from ε divides by sqrt(ᾱ), tiny only at the very end.
  alpha_bar = SCHEDULE.alphas_cumprod[t]
  x_t = q_sample(SCHEDULE, x0, t, eps)
  target = prediction_target(prediction, x0, eps, alpha_bar)
  x0_hat, eps_hat = x0_and_eps(prediction, target, x_t, alpha_bar)
  # float32 rounding of x_t is amplified by 1/sqrt(ᾱ) (x0 from ε) or 1/sqrt(1-ᾱ) (ε from x0):
  # up to 100x at t = 0 for this schedule.
  np.testing.assert_allclose(x0_hat, x0, atol=1e-3)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-3)
  np.testing.assert_allclose(x0_from_eps(x_t, eps, alpha_bar), x0, atol=1e-3)
  np.testing.assert_allclose(eps_from_x0(x_t, x0, alpha_bar), eps, atol=1e-3)


def test_score_of_gaussian_perturbation_kernel():
  """∇ log N(x_t; sqrt(ᾱ) x0, (1-ᾱ) I) = -(x_t - sqrt(ᾱ) x0) / (1-ᾱ), checked by autodiff."""
  x0, eps, t = _data()
  alpha_bar = SCHEDULE.alphas_cumprod[t]
  x_t = q_sample(SCHEDULE, x0, t, eps)
  ab = alpha_bar[:, None, None, None]
  log_density = lambda x: jnp.sum(-0.5 * (x - jnp.sqrt(ab) * x0)**2 / (1 - ab))
  score = jax.grad(log_density)(x_t)
  np.testing.assert_allclose(score_from_eps(eps, alpha_bar), score, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(eps_from_score(score, alpha_bar), eps, rtol=1e-4, atol=1e-4)


def test_unknown_prediction():
  with pytest.raises(ValueError, match="prediction='score'"):
    prediction_target("score", jnp.zeros(2), jnp.zeros(2), 0.5)
