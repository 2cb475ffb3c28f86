"""Samplers against diffusers' schedulers step by step, on an exact Gaussian, and their own loop."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from jaxdiff.diffusion import make_schedule, sample, sampler_tables, samplers

T = 1000
SCHEDULE = make_schedule("linear", T)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler}
NOISE_FUNCTIONS = {"ddpm": scheduling_ddpm, "euler_ancestral": scheduling_euler_ancestral_discrete}
SLOPE = 1.3


def jax_model(x, t):
  """A nonlinear stand-in for a network: tanh(1.3 x + t / 1000), elementwise."""
  return jnp.tanh(SLOPE * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0)


def torch_model(x, t):
  return torch.tanh(SLOPE * x + float(t) / 1000.0)


def _x_T(shape=(2, 4, 4, 3), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_scheduler(method, num_steps, **config):
  """diffusers' scheduler of `method` with its defaults, except the schedule (linear 1e-4..0.02,
  which Heun's defaults differ from) and `config`."""
  scheduler = SCHEDULERS[method](num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                 beta_schedule="linear", **config)
  scheduler.set_timesteps(num_steps)
  return scheduler


def diffusers_trajectory(method, scheduler, x_T, model=torch_model, noises=None, monkeypatch=None):
  """Runs diffusers' sampling loop as its pipelines do: x_T · init_noise_sigma, scale_model_input,
  step. Returns [n + 1, ...] float64 on the VP scale (σ-space y / sqrt(σ² + 1)) after each
  completed step. `noises` [n, ...] replaces the scheduler's `randn_tensor` draws in order."""
  if noises is not None:
    draws = iter(torch.from_numpy(np.asarray(n)) for n in noises)
    monkeypatch.setattr(NOISE_FUNCTIONS[method], "randn_tensor", lambda *a, **k: next(draws))
  sigma_space = sampler_tables.FAMILIES[method] == "sigma"
  x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
  frames = [x.double() / (scheduler.sigmas.max().double()**2 + 1).sqrt() if sigma_space
            else x.double()]
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    last = i == len(scheduler.timesteps) - 1
    if method == "heun" and not scheduler.state_in_first_order and not last:
      continue  # Halfway through a Heun step.
    scale = (scheduler.sigmas[scheduler.step_index].double()**2 + 1).sqrt() if sigma_space else 1
    frames.append(x.double() / scale)
  return torch.stack(frames).numpy()


def jax_noises(method, num_steps, key, shape):
  """The noise `sample` draws at each step."""
  keys = samplers.example_keys(key, shape[0])
  return [np.asarray(samplers.step_noise(keys, k, shape)) for k in range(num_steps)]


def assert_trajectories_close(got, expected, rtol=1e-4):
  """Max |got - expected| relative to max |expected| at each step."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape
  axes = tuple(range(1, got.ndim))
  error = np.abs(got - expected).max(axis=axes) / np.abs(expected).max(axis=axes)
  assert error.max() < rtol, error


CASES = list(itertools.product(
    ["ddpm", "ddim", "dpmpp_2m", "unipc", "euler", "euler_ancestral", "heun"], ["eps", "v"],
    [("leading", 7), ("linspace", 20), ("trailing", 7), ("trailing", 20)]))
VARIANTS = [  # (method, sample options, diffusers options), on top of the defaults.
    ("unipc", dict(solver_order=3), dict(solver_order=3)),
    ("unipc", dict(solver_order=3, karras_sigmas=True), dict(solver_order=3, use_karras_sigmas=True)),
    ("dpmpp_2m", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("unipc", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("euler", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("euler", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("heun", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("ddim", dict(steps_offset=1, set_alpha_to_one=False), dict(steps_offset=1, set_alpha_to_one=False)),
    ("ddim", dict(eta=0.0, spacing="linspace"), dict(timestep_spacing="linspace")),
    ("dpmpp_2m", dict(steps_offset=1, spacing="leading"), dict(steps_offset=1, timestep_spacing="leading")),
    ("euler", dict(steps_offset=1, spacing="leading"), dict(steps_offset=1, timestep_spacing="leading")),
]


def _check_against_diffusers(monkeypatch, method, prediction, num_steps, options, diffusers_options):
  x_T, key = _x_T(), jax.random.key(3)
  noisy = method in NOISE_FUNCTIONS
  config = dict(prediction_type=DIFFUSERS_PREDICTION[prediction]) | diffusers_options
  if method in ("ddpm", "ddim"):
    config["clip_sample"] = False  # diffusers' default is True; jaxdiff's is off.
  scheduler = make_scheduler(method, num_steps, **config)
  noises = jax_noises(method, num_steps, key, x_T.shape) if noisy else None
  expected = diffusers_trajectory(method, scheduler, x_T, noises=noises, monkeypatch=monkeypatch)
  _, trajectory = sample(jax_model, SCHEDULE, x_T, key, method=method, num_steps=num_steps,
                         prediction=prediction, return_trajectory=True, **options)
  assert_trajectories_close(trajectory, expected)


@pytest.mark.parametrize("method, prediction, grid", CASES)
def test_trajectory_matches_diffusers(monkeypatch, method, prediction, grid):
  spacing, num_steps = grid
  _check_against_diffusers(monkeypatch, method, prediction, num_steps, dict(spacing=spacing),
                           dict(timestep_spacing=spacing))


@pytest.mark.parametrize("method, options, diffusers_options", VARIANTS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_options_match_diffusers(monkeypatch, method, options, diffusers_options, prediction):
  _check_against_diffusers(monkeypatch, method, prediction, 9, options, diffusers_options)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_default_spacing_is_the_diffusers_default(monkeypatch, method):
  """spacing=None reproduces the scheduler built with diffusers' defaults (x0 for DDIM's clip)."""
  _check_against_diffusers(monkeypatch, method, "eps", 12, {}, {})


def test_ddim_with_clip_sample_matches_diffusers():
  """clip_sample=True in diffusers keeps the model's ε: use_clipped_model_output=False."""
  x_T = 3 * _x_T()
  expected = diffusers_trajectory("ddim", make_scheduler("ddim", 10, clip_sample=True), x_T)
  _, got = sample(jax_model, SCHEDULE, x_T, jax.random.key(0), method="ddim", num_steps=10,
                  clip_denoised=True, use_clipped_model_output=False, return_trajectory=True)
  assert_trajectories_close(got, expected)
  _, rederived = sample(jax_model, SCHEDULE, x_T, jax.random.key(0), method="ddim", num_steps=10,
                        clip_denoised=True, return_trajectory=True)
  assert not np.allclose(rederived, expected, rtol=1e-3)
