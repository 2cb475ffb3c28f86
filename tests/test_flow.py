"""Flow matching against diffusers' FlowMatch schedulers, closed forms and an exact Gaussian."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from jaxdiff.diffusion import flow

SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def jax_velocity(x, t):
  return jnp.tanh(1.3 * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0) - 0.5 * x


def torch_velocity(x, t):
  return torch.tanh(1.3 * x + float(t) / 1000.0) - 0.5 * x


def _x_T(shape=(2, 4, 4, 3), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("method, shift, num_steps", [
    ("euler", 1.0, 7), ("euler", 3.0, 20), ("heun", 1.0, 20), ("heun", 3.0, 7)])
def test_trajectory_matches_diffusers(method, shift, num_steps):
  x_T = _x_T()
  scheduler = SCHEDULERS[method](num_train_timesteps=1000, shift=shift)
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(x_T)
  expected = [x]
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(torch_velocity(x, t), t, x).prev_sample
    if method == "euler" or scheduler.state_in_first_order or i == len(scheduler.timesteps) - 1:
      expected.append(x)
  expected = torch.stack(expected).numpy()
  _, got = flow.sample_flow(jax_velocity, x_T, jax.random.key(0), num_steps=num_steps,
                            method=method, shift=shift, return_trajectory=True)
  np.testing.assert_allclose(flow.flow_sigmas(num_steps, shift), scheduler.sigmas.numpy()
                             if method == "euler" else np.unique(scheduler.sigmas.numpy())[::-1],
                             rtol=1e-6)
  scale = np.abs(expected).max(axis=(1, 2, 3, 4), keepdims=True)
  assert np.max(np.abs(got - expected) / scale) < 1e-4


def test_conversions_invert_the_interpolant():
  rng = np.random.default_rng(1)
  x0, noise = rng.standard_normal((2, 3, 3, 1)), rng.standard_normal((2, 3, 3, 1))
  t = np.array([0.2, 0.9])
  x_t = flow.interpolate(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  t4 = t[:, None, None, None]
  np.testing.assert_allclose(x_t, (1 - t4) * x0 + t4 * noise, rtol=1e-6, atol=1e-6)
  v = flow.velocity(jnp.asarray(x0), jnp.asarray(noise))
  np.testing.assert_allclose(flow.x0_from_velocity(x_t, v, jnp.asarray(t)), x0, atol=1e-5)
  np.testing.assert_allclose(flow.eps_from_velocity(x_t, v, jnp.asarray(t)), noise, atol=1e-5)


def test_shift_closed_form():
  np.testing.assert_allclose(flow.shift_timesteps(np.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])


def _draw(sampling, shift=1.0, n=8192, **options):
  keys = jax.random.split(jax.random.key(0), n)
  t, noise = flow.flow_training_inputs(keys, jnp.zeros((n, 1)), sampling=sampling, shift=shift,
                                       **options)
  return np.asarray(t, np.float64), np.asarray(noise)


def test_timestep_sampling_distributions():
  uniform, noise = _draw("uniform")
  assert abs(uniform.mean() - 0.5) < 0.01 and abs(noise.std() - 1) < 0.03
  logits = np.log(_draw("logit_normal", logit_mean=0.5, logit_std=0.8)[0])
  logits -= np.log1p(-np.exp(logits))
  assert abs(logits.mean() - 0.5) < 0.03 and abs(logits.std() - 0.8) < 0.03
  mode = _draw("mode", mode_scale=1.29)[0]
  u = np.random.default_rng(0).uniform(size=8192)
  expected = 1 - u - 1.29 * (np.cos(np.pi / 2 * u)**2 - 1 + u)
  assert np.abs(np.sort(mode) - np.sort(expected)).max() < 0.03
  np.testing.assert_allclose(_draw("uniform", shift=3.0)[0], flow.shift_timesteps(uniform, 3.0),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="sampling='beta'"):
    _draw("beta")


def test_loss_is_the_velocity_regression():
  rng = np.random.default_rng(2)
  x0, noise = rng.standard_normal((3, 4, 4, 2)), rng.standard_normal((3, 4, 4, 2))
  t = np.array([0.1, 0.5, 0.95])
  calls = []

  def model_fn(x, t_model):
    calls.append(np.asarray(t_model))
    return 0.3 * x

  loss, _ = flow.flow_matching_loss(model_fn, jnp.asarray(x0, jnp.float32),
                                    jnp.asarray(t, jnp.float32), jnp.asarray(noise, jnp.float32))
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
  expected = ((0.3 * x_t - (noise - x0))**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(calls[0], t * 1000, rtol=1e-6)


MU, STD = 0.5, 0.3


def gaussian_velocity(x, t_model):
  """E[ε - x_0 | x_t] for x_0 ~ N(MU, STD²): x_t ~ N((1-t) MU, (1-t)² STD² + t²)."""
  t = (t_model / 1000.0)[:, None, None, None]
  residual = (x - (1 - t) * MU) / ((1 - t)**2 * STD**2 + t**2)
  return t * residual - (MU + (1 - t) * STD**2 * residual)


@pytest.mark.parametrize("method, num_steps, options, tolerance", [
    ("euler", 100, {}, 0.01), ("heun", 20, dict(shift=3.0), 0.005),
    ("euler_maruyama", 100, dict(diffusion_scale=1.0), 0.015)])
def test_gaussian_is_recovered(method, num_steps, options, tolerance):
  x_T = jax.random.normal(jax.random.key(0), (128, 8, 4, 1))
  x_T = (x_T - x_T.mean()) / x_T.std()
  x = np.asarray(flow.sample_flow(gaussian_velocity, x_T, jax.random.key(1), num_steps=num_steps,
                                  method=method, **options), np.float64)
  assert abs(x.mean() - MU) < tolerance and abs(x.std() - STD) < tolerance


def test_guidance_equals_guided_model():
  cond = lambda x, t: jax_velocity(x, t) * 1.5
  doubled = lambda x, t: jnp.concatenate([cond(x[:2], t[:2]), jax_velocity(x[2:], t[2:])])
  guided = lambda x, t: jax_velocity(x, t) + 4.0 * (cond(x, t) - jax_velocity(x, t))
  a = flow.sample_flow(doubled, _x_T(), jax.random.key(0), num_steps=5, guidance_scale=4.0)
  b = flow.sample_flow(guided, _x_T(), jax.random.key(0), num_steps=5)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="method='rk4'"):
    flow.sample_flow(jax_velocity, _x_T(), jax.random.key(0), num_steps=5, method="rk4")
  with pytest.raises(ValueError, match="shift=0"):
    flow.sample_flow(jax_velocity, _x_T(), jax.random.key(0), num_steps=5, shift=0)
