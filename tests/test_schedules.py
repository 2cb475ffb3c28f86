"""Schedules and timestep grids against diffusers and float64 closed forms."""
import math

import numpy as np
import pytest
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from jaxdiff.diffusion import karras_sigmas, make_schedule, sigma_table, timesteps
from jaxdiff.diffusion.schedules import sigma_to_timestep

T = 1000


@pytest.mark.parametrize("name, diffusers_name, beta_range, rescale", [
    ("linear", "linear", (1e-4, 0.02), False),
    ("scaled_linear", "scaled_linear", (0.00085, 0.012), False),
    ("quadratic", "scaled_linear", (1e-4, 0.02), False),
    ("cosine", "squaredcos_cap_v2", (1e-4, 0.02), False),
    ("sigmoid", "sigmoid", (1e-4, 0.02), False),
    ("linear", "linear", (1e-4, 0.02), True),
    ("scaled_linear", "scaled_linear", (0.00085, 0.012), True),
])
def test_schedule_matches_diffusers(name, diffusers_name, beta_range, rescale):
  schedule = make_schedule(name, T, rescale_zero_terminal_snr=rescale)
  ref = DDPMScheduler(num_train_timesteps=T, beta_start=beta_range[0], beta_end=beta_range[1],
                      beta_schedule=diffusers_name, rescale_betas_zero_snr=rescale)
  ref_betas = ref.betas.numpy()
  if rescale:  # diffusers rescales in float32, which loses digits near t = T; redo it in float64.
    unscaled = DDPMScheduler(num_train_timesteps=T, beta_start=beta_range[0],
                             beta_end=beta_range[1], beta_schedule=diffusers_name).betas
    ref_betas = rescale_zero_terminal_snr(unscaled.double()).numpy()
  np.testing.assert_allclose(schedule.betas, ref_betas, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(),
                             rtol=2e-5, atol=1e-7)
  assert schedule.betas.dtype == np.float32 and schedule.betas.shape == (T,)


def test_exponential_matches_diffusers_alpha_bar_transform():
  schedule = make_schedule("exponential", T)
  ref = betas_for_alpha_bar(T, alpha_transform_type="exp").numpy()
  np.testing.assert_allclose(schedule.betas, ref, rtol=1e-6)


def test_cosine_closed_form_alpha_bar_and_clip():
  schedule = make_schedule("cosine", T)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2)**2
  expected = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
  # ᾱ_t = f(t/T) / f(0) until the 0.999 clip at the very end.
  np.testing.assert_allclose(schedule.alphas_cumprod[:-5], expected[:-5], rtol=1e-5, atol=1e-9)
  assert float(schedule.betas[-1]) == pytest.approx(0.999)


def test_constant_schedule_closed_form():
  schedule = make_schedule("constant", 50, beta_end=0.01)
  np.testing.assert_allclose(schedule.alphas_cumprod, 0.99**np.arange(1, 51), rtol=1e-6)


def test_zero_terminal_snr():
  schedule = make_schedule("scaled_linear", T, rescale_zero_terminal_snr=True)
  original = make_schedule("scaled_linear", T)
  assert float(schedule.alphas_cumprod[-1]) == 0.0
  np.testing.assert_allclose(schedule.alphas_cumprod[0], original.alphas_cumprod[0], rtol=1e-6)


def test_posterior_tables_float64():
  schedule = make_schedule("linear", T)
  betas = np.linspace(1e-4, 0.02, T)
  alpha_bar = np.cumprod(1 - betas)
  prev = np.append(1.0, alpha_bar[:-1])
  variance = betas * (1 - prev) / (1 - alpha_bar)
  np.testing.assert_allclose(schedule.alphas_cumprod_prev, prev, rtol=1e-5)
  np.testing.assert_allclose(schedule.posterior_variance, variance, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(schedule.posterior_log_variance_clipped,
                             np.log(np.append(variance[1], variance[1:])), rtol=1e-5)
  np.testing.assert_allclose(schedule.posterior_mean_coef1,
                             betas * np.sqrt(prev) / (1 - alpha_bar), rtol=1e-5)
  np.testing.assert_allclose(schedule.posterior_mean_coef2,
                             (1 - prev) * np.sqrt(1 - betas) / (1 - alpha_bar), rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 7, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, num_steps):
  ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
  ref.set_timesteps(num_steps)
  grid = timesteps(make_schedule("linear", T), num_steps, spacing)
  assert grid.dtype == np.int32
  np.testing.assert_array_equal(grid, ref.timesteps.numpy())
  assert np.all(np.diff(grid) < 0)


@pytest.mark.parametrize("convention, scheduler", [
    ("multistep", DPMSolverMultistepScheduler), ("multistep", UniPCMultistepScheduler),
    ("sigma", EulerDiscreteScheduler)])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps, steps_offset", [(1, 0), (7, 1), (50, 0), (333, 0)])
def test_solver_and_sigma_grids_match_diffusers(convention, scheduler, spacing, num_steps,
                                                steps_offset):
  ref = scheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
  ref.set_timesteps(num_steps)
  grid = timesteps(make_schedule("linear", T), num_steps, spacing, steps_offset, convention)
  assert grid.dtype == (np.float32 if convention == "sigma" else np.int32)
  np.testing.assert_array_equal(grid, ref.timesteps.numpy())


def test_multistep_grids_never_reach_zero():
  """n + 1 points with the last dropped (PITFALLS): T=1000, n=20 leading ends at 47, not 0."""
  schedule = make_schedule("linear", T)
  assert timesteps(schedule, 20, "leading", convention="multistep")[-1] == 47
  assert timesteps(schedule, 20, "linspace", convention="multistep")[-1] == 50
  assert timesteps(schedule, 20, "linspace")[-1] == 0


def test_sigma_helpers_match_diffusers():
  ref = EulerDiscreteScheduler(num_train_timesteps=T)
  table = sigma_table(make_schedule("linear", T))
  # diffusers multiplies ᾱ in float32, whose rounding shows in 1 - ᾱ for small t.
  np.testing.assert_allclose(table, ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt().numpy(),
                             rtol=3e-4)
  log_table = np.log(table)
  sigmas = np.array([table[0], 0.5, 3.0, 77.7, table[-1]])
  np.testing.assert_allclose(sigma_to_timestep(sigmas, table), ref._sigma_to_t(sigmas, log_table),
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(karras_sigmas(0.03, 80.0, 9),
                             ref._convert_to_karras(np.array([80.0, 0.03]), 9), rtol=1e-12)


def test_known_grids_from_pitfalls():
  schedule = make_schedule("linear", T)
  assert timesteps(schedule, 50, "leading")[0] == 980
  assert timesteps(schedule, 50, "trailing")[0] == 999
  assert timesteps(schedule, 50, "linspace")[0] == 999


@pytest.mark.parametrize("call, match", [
    (lambda: make_schedule("foo"), "name='foo'"),
    (lambda: make_schedule("linear", 1), "num_timesteps=1"),
    (lambda: timesteps(make_schedule("linear", T), 2000, "leading"),
     "num_steps=2000 exceeds schedule.num_timesteps=1000"),
    (lambda: timesteps(make_schedule("linear", T), 10, "middle"), "spacing='middle'"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


