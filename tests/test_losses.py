"""Training inputs and losses against float64 NumPy, PyTorch losses and the Gaussian KL."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from jaxdiff.diffusion import diffusion_loss, make_schedule, min_snr_weight, training_inputs
from jaxdiff.diffusion.losses import schedule_snr

T = 1000
SCHEDULE = make_schedule("linear", T)
BETAS64 = np.linspace(1e-4, 0.02, T)
ALPHA_BAR64 = np.cumprod(1 - BETAS64)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x0 = (rng.integers(0, 256, (4, 4, 4, 3)) / 127.5 - 1).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  return x0, noise, np.array([0, 3, 400, 999], np.int32)


def _model(x, t):
  return jnp.tanh(1.3 * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0)


def _reference_simple(x0, noise, t, prediction):
  """Float64 x_t, model output and target."""
  ab = ALPHA_BAR64[t][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  out = np.tanh(1.3 * x_t + t[:, None, None, None] / 1000.0)
  target = {"eps": noise, "x0": x0, "v": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}[prediction]
  return x_t, out, target


def test_training_inputs_are_per_example():
  keys = jax.random.split(jax.random.key(0), 4096)
  x0 = jnp.zeros((4096, 2, 2, 1))
  t, noise = training_inputs(SCHEDULE, keys, x0)
  assert t.dtype == jnp.int32 and t.shape == (4096,) and noise.shape == x0.shape
  assert int(t.min()) >= 0 and int(t.max()) <= T - 1
  t_part, noise_part = training_inputs(SCHEDULE, keys[10:20], x0[10:20])
  np.testing.assert_array_equal(t[10:20], t_part)
  np.testing.assert_array_equal(noise[10:20], noise_part)
  # Uniform on {0..T-1}: mean (T-1)/2, std T/sqrt(12); noise N(0, 1).
  assert abs(float(t.mean()) - (T - 1) / 2) < 4 * T / math.sqrt(12 * 4096)
  assert abs(float(noise.std()) - 1) < 0.03 and abs(float(noise.mean())) < 0.03


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_simple_loss_matches_torch(prediction, loss_type):
  x0, noise, t = _batch()
  loss, aux = diffusion_loss(_model, SCHEDULE, x0, t, noise, prediction=prediction,
                             loss_type=loss_type, huber_delta=0.3)
  _, out, target = _reference_simple(x0, noise, t, prediction)
  out, target = torch.from_numpy(out), torch.from_numpy(target)
  elementwise = {"l2": F.mse_loss(out, target, reduction="none"),
                 "l1": F.l1_loss(out, target, reduction="none"),
                 "huber": F.huber_loss(out, target, reduction="none", delta=0.3)}[loss_type]
  expected = elementwise.mean(dim=(1, 2, 3)).numpy()
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux["loss_simple"], expected, rtol=1e-4, atol=1e-6)
  assert loss.shape == (4,) and loss.dtype == jnp.float32


def test_huber_with_unit_delta_is_smooth_l1():
  x0, noise, t = _batch()
  loss, _ = diffusion_loss(_model, SCHEDULE, x0, t, noise, loss_type="huber", huber_delta=1.0)
  _, out, target = _reference_simple(x0, noise, t, "eps")
  expected = F.smooth_l1_loss(torch.from_numpy(out), torch.from_numpy(target),
                              reduction="none").mean(dim=(1, 2, 3)).numpy()
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights(prediction):
  x0, noise, t = _batch()
  gamma = 5.0
  snr = ALPHA_BAR64[t] / (1 - ALPHA_BAR64[t])
  # Hang et al. eq. 13 in x0 space, carried to each target by ‖ε‖² = SNR‖x0‖², ‖v‖² = (SNR+1)‖x0‖².
  expected = np.minimum(snr, gamma) / {"eps": snr, "x0": 1.0, "v": snr + 1}[prediction]
  loss, aux = diffusion_loss(_model, SCHEDULE, x0, t, noise, prediction=prediction,
                             weighting="min_snr", min_snr_gamma=gamma)
  np.testing.assert_allclose(aux["weight"], expected, rtol=1e-4)
  np.testing.assert_allclose(loss, expected * aux["loss_simple"], rtol=1e-4)


def test_min_snr_is_finite_at_zero_terminal_snr():
  schedule = make_schedule("scaled_linear", T, rescale_zero_terminal_snr=True)
  snr = schedule_snr(schedule, jnp.array([0, T - 1]))
  assert float(snr[1]) == 0.0
  for prediction, at_zero in [("eps", 1.0), ("x0", 0.0), ("v", 0.0)]:
    weights = min_snr_weight(snr, prediction, 5.0)
    assert float(weights[1]) == at_zero and np.all(np.isfinite(weights))


def _learned_model(mean_scale, v_value):
  def model_fn(x, t):
    eps = mean_scale * _model(x, t)
    return jnp.concatenate([eps, jnp.full_like(x, v_value)], -1)
  return model_fn


def test_hybrid_loss_is_mse_plus_gaussian_kl():
  """Hand computation: L = mse + λ T KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) / log 2 (bits/dim)."""
  x0, noise, t = _batch()
  t = np.array([1, 3, 400, 999], np.int32)
  v_value = 0.3
  loss, aux = diffusion_loss(_learned_model(1.0, v_value), SCHEDULE, x0, t, noise,
                             learn_sigma=True, vlb_weight=1e-3)
  x_t, eps_hat, _ = _reference_simple(x0, noise, t, "eps")
  ab = ALPHA_BAR64[t][:, None, None, None]
  ab_prev = np.append(1.0, ALPHA_BAR64[:-1])[t][:, None, None, None]
  beta = BETAS64[t][:, None, None, None]
  coef1, coef2 = beta * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)
  true_mean = coef1 * x0 + coef2 * x_t
  true_var = beta * (1 - ab_prev) / (1 - ab)
  model_mean = coef1 * (x_t - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab) + coef2 * x_t
  frac = (v_value + 1) / 2
  model_var = np.exp(frac * np.log(beta) + (1 - frac) * np.log(true_var))
  kl = 0.5 * (np.log(model_var / true_var) + (true_var + (true_mean - model_mean)**2) / model_var
              - 1)
  vlb = kl.mean(axis=(1, 2, 3)) / math.log(2)
  mse = ((eps_hat - noise)**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(aux["vlb"], vlb, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(loss, mse + 1e-3 * T * vlb, rtol=2e-3, atol=1e-6)


def test_hybrid_loss_at_t0_is_discretized_decoder_nll():
  x0, noise, _ = _batch()
  t = np.zeros((4,), np.int32)
  _, aux = diffusion_loss(_learned_model(1.0, -0.5), SCHEDULE, x0, t, noise, learn_sigma=True)
  x_t, eps_hat, _ = _reference_simple(x0, noise, t, "eps")
  ab = ALPHA_BAR64[0]
  mean = (x_t - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab)  # μ̃ at t = 0 is x̂_0 (coef1 = 1).
  # At t = 0 both ends of the learned range: log β_0 and the clipped log β̃ (= log β̃_1).
  small = BETAS64[1] * (1 - ALPHA_BAR64[0]) / (1 - ALPHA_BAR64[1])
  std = np.exp(0.5 * (0.25 * np.log(BETAS64[0]) + 0.75 * np.log(small)))
  upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  prob = scipy.stats.norm.cdf(upper, mean, std) - scipy.stats.norm.cdf(lower, mean, std)
  nll = -np.log(np.maximum(prob, 1e-12)).mean(axis=(1, 2, 3)) / math.log(2)
  np.testing.assert_allclose(aux["vlb"], nll, rtol=1e-3)


def test_vlb_term_trains_only_the_variance_channels():
  """d loss / d mean-scale equals the derivative of the MSE term alone (stop-gradient)."""
  x0, noise, t = _batch()
  t = np.array([5, 50, 500, 900], np.int32)

  def total(params):
    loss, _ = diffusion_loss(_learned_model(params[0], params[1]), SCHEDULE, x0, t, noise,
                             learn_sigma=True)
    return loss.mean()

  grads = jax.grad(total)(jnp.array([0.8, 0.1]))
  _, out, target = _reference_simple(x0, noise, t, "eps")
  expected_mean_grad = (2 * (0.8 * out - target) * out).mean()
  np.testing.assert_allclose(grads[0], expected_mean_grad, rtol=1e-4)
  assert abs(float(grads[1])) > 0


@pytest.mark.parametrize("options, match", [
    (dict(prediction="score"), "prediction='score'"),
    (dict(loss_type="l3"), "loss_type='l3'"),
    (dict(weighting="p2"), "weighting='p2'"),
    (dict(learn_sigma=True), "learn_sigma=True"),
])
def test_bad_arguments(options, match):
  x0, noise, t = _batch()
  with pytest.raises(ValueError, match=match):
    diffusion_loss(_model, SCHEDULE, x0, t, noise, **options)
