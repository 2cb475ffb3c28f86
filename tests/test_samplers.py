"""Samplers against diffusers' schedulers step by step, on an exact Gaussian, and their own loop."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.diffusion import make_schedule, sample, sampler_tables, samplers
from scheduler_reference import (assert_trajectories_close, DIFFUSERS_PREDICTION,
                                 diffusers_trajectory, jax_model, jax_noises, make_scheduler,
                                 NOISE_FUNCTIONS, SCHEDULERS, T, torch_model)

SCHEDULE = make_schedule("linear", T)


def _x_T(shape=(2, 4, 4, 3), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
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
