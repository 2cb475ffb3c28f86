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
GRIDS = [("leading", 7), ("linspace", 20), ("trailing", 7), ("trailing", 20)]
# The full matrix runs in the slow step; the default run keeps two grids per method and
# prediction that together cover every spacing-convention difference (n + 1 points, fractional
# linspace, leading's T // (n + 1)) and both step counts.
CASES = [pytest.param(method, prediction, grid,
                      marks=() if (prediction == "eps") == (i in (0, 3)) else pytest.mark.slow)
         for method, prediction in itertools.product(
             ["ddpm", "ddim", "dpmpp_2m", "unipc", "euler", "euler_ancestral", "heun"],
             ["eps", "v"])
         for i, grid in enumerate(GRIDS)]
VARIANTS = [  # (method, sample options, diffusers options), on top of the defaults.
    ("unipc", dict(solver_order=3), dict(solver_order=3)),
    ("unipc", dict(solver_order=3, karras_sigmas=True),
     dict(solver_order=3, use_karras_sigmas=True)),
    ("dpmpp_2m", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("unipc", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("euler", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("euler", dict(final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min")),
    ("heun", dict(karras_sigmas=True), dict(use_karras_sigmas=True)),
    ("ddim", dict(steps_offset=1, set_alpha_to_one=False),
     dict(steps_offset=1, set_alpha_to_one=False)),
    ("ddim", dict(eta=0.0, spacing="linspace"), dict(timestep_spacing="linspace")),
    ("dpmpp_2m", dict(steps_offset=1, spacing="leading"),
     dict(steps_offset=1, timestep_spacing="leading")),
    ("euler", dict(steps_offset=1, spacing="leading"),
     dict(steps_offset=1, timestep_spacing="leading")),
]


def _check_against_diffusers(monkeypatch, method, prediction, num_steps, options,
                             diffusers_options):
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
@pytest.mark.parametrize("prediction", ["eps", pytest.param("v", marks=pytest.mark.slow)])
def test_options_match_diffusers(monkeypatch, method, options, diffusers_options, prediction):
  # 7 steps with eps: the jitted sampler is shared with the (method, eps, 7 steps) grid case.
  _check_against_diffusers(monkeypatch, method, prediction, 7, options, diffusers_options)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_default_spacing_is_the_diffusers_default(monkeypatch, method):
  """spacing=None reproduces the scheduler built with diffusers' defaults (x0 for DDIM's clip)."""
  _check_against_diffusers(monkeypatch, method, "eps", 7, {}, {})


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


@pytest.mark.parametrize("variance, k", [
    ("fixed_small", 3), ("fixed_large", 7), ("learned", 5), ("fixed_small", 9)])
def test_one_ddpm_step_matches_diffusers(variance, k):
  """Learned variance included (diffusers splits the variance channels on axis 1)."""
  learned = variance == "learned"
  ref = make_scheduler("ddpm", 10, clip_sample=False, timestep_spacing="trailing",
                       variance_type="learned_range" if learned else variance)
  x, v = _x_T(seed=3), np.tanh(_x_T(seed=4))
  t = ref.timesteps[k]
  torch_x = torch.from_numpy(x).permute(0, 3, 1, 2)
  torch_out = torch_model(torch_x, t)
  if learned:
    torch_out = torch.cat([torch_out, torch.from_numpy(v).permute(0, 3, 1, 2)], 1)
  expected = ref.step(torch_out, t, torch_x, generator=torch.Generator().manual_seed(0)).prev_sample
  noise = torch.randn(torch_x.shape, generator=torch.Generator().manual_seed(0))
  model_fn = (lambda x_, t_: jnp.concatenate([jax_model(x_, t_), v], -1)) if learned else jax_model
  out = _one_step("ddpm", model_fn, k=k, spacing="trailing",
                  noise=noise.permute(0, 2, 3, 1).numpy(), x=x, variance=variance)
  np.testing.assert_allclose(out, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def _one_step(method, model_fn, k=4, spacing="leading", noise=None, x=None, **options):
  x = jnp.asarray(_x_T(seed=8) if x is None else x)
  noise = jnp.asarray(_x_T(seed=9) if noise is None else noise)
  tables = sampler_tables.method_tables(SCHEDULE, method, 10, spacing)
  params = jax.tree.map(lambda a: a[k], samplers.step_params(tables))
  config = samplers.StepOptions(method=method, **options)
  state = samplers.initial_state(method, x)
  return samplers.sampler_step(model_fn, config, state, params, noise, final=False).x


@pytest.mark.parametrize("v, reference", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_variance_endpoints(v, reference):
  """v = -1 is the posterior variance β̃ and v = +1 is β (Nichol & Dhariwal eq. 15)."""
  learned = lambda x, t: jnp.concatenate([jax_model(x, t), jnp.full_like(x, v)], -1)
  np.testing.assert_allclose(_one_step("ddpm", learned, variance="learned"),
                             _one_step("ddpm", jax_model, variance=reference), rtol=1e-5, atol=1e-6)


def test_ddim_with_eta_one_is_the_ddpm_posterior():
  """DDIM with η = 1 samples q(x_{t-1} | x_t, x̂_0), i.e. DDPM with β̃ (Song et al. sec. 4.1)."""
  np.testing.assert_allclose(_one_step("ddim", jax_model, eta=1.0),
                             _one_step("ddpm", jax_model, variance="fixed_small"),
                             rtol=1e-5, atol=1e-5)


MU, STD = 0.5, 0.3
SIGMA_TABLE = np.sqrt((1 - np.asarray(SCHEDULE.alphas_cumprod, np.float64))
                      / np.asarray(SCHEDULE.alphas_cumprod, np.float64))


def _gaussian_eps(x, alpha_bar):
  """E[ε | x_t] for data N(MU, STD²): sqrt(1-ᾱ) (x_t - sqrt(ᾱ) MU) / (ᾱ STD² + 1 - ᾱ)."""
  return (1 - alpha_bar)**0.5 * (x - alpha_bar**0.5 * MU) / (alpha_bar * STD**2 + 1 - alpha_bar)


def gaussian_jax_model(x, t):
  """The exact ε at (fractional) t, with σ(t) interpolated linearly as the samplers do."""
  sigma = jnp.interp(t.astype(jnp.float32), jnp.arange(T, dtype=jnp.float32),
                     jnp.asarray(SIGMA_TABLE, jnp.float32))
  return _gaussian_eps(x, (1.0 / (1.0 + sigma**2))[:, None, None, None])


def gaussian_torch_model(x, t):
  sigma = np.interp(float(t), np.arange(T), SIGMA_TABLE)
  return _gaussian_eps(x, 1.0 / (1.0 + sigma**2))


@pytest.mark.parametrize("method", samplers.METHODS)
def test_gaussian_recovery_no_worse_than_diffusers_default(method):
  """Exact ε of N(0.5, 0.3²), 20 steps, 8192 samples: default settings recover the std at least
  as well as the diffusers scheduler's default config (up to 0.01)."""
  x_T = np.asarray(jax.random.normal(jax.random.key(0), (128, 8, 8, 1)))
  ref = SCHEDULERS[method](num_train_timesteps=T, beta_start=1e-4, beta_end=0.02)
  ref.set_timesteps(20)
  torch.manual_seed(0)
  expected = diffusers_trajectory(method, ref, x_T, model=gaussian_torch_model)[-1]
  got = np.asarray(sample(gaussian_jax_model, SCHEDULE, x_T, jax.random.key(1), method=method,
                          num_steps=20), np.float64)
  assert abs(got.std() - STD) <= abs(expected.std() - STD) + 0.01, (got.std(), expected.std())
  assert abs(got.mean() - MU) < 0.02


def _python_loop(model_fn, x_T, key, method, num_steps, **options):
  """The same step function, called step by step from Python."""
  config = samplers.StepOptions(method=method)
  tables = sampler_tables.method_tables(SCHEDULE, method, num_steps, "leading", **options)
  params = samplers.step_params(tables)
  keys = samplers.example_keys(key, x_T.shape[0])
  state = samplers.initial_state(method, jnp.asarray(x_T) * float(tables.get("init_scale", 1.0)))
  for k in range(num_steps):
    final = k == num_steps - 1
    noise = samplers.step_noise(keys, k, x_T.shape) if samplers.needs_noise(config, final) else None
    state = samplers.sampler_step(model_fn, config, state, jax.tree.map(lambda a: a[k], params),
                                  noise, final=final)
  return state.x


@pytest.mark.parametrize("method, options", [
    ("ddpm", {}), ("unipc", dict(solver_order=3)), ("heun", {}), ("euler_ancestral", {})])
def test_scan_equals_python_loop(method, options):
  x_T = _x_T()
  expected = _python_loop(jax_model, x_T, jax.random.key(5), method, 7, **options)
  got, _ = sample(jax_model, SCHEDULE, x_T, jax.random.key(5), method=method, num_steps=7,
                  spacing="leading", return_trajectory=True, **options)
  # Same arithmetic; only XLA's fusion of the scan body may reassociate float32 operations.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "unipc", "heun"])
def test_compiles_once_per_shape(method):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x_T, key):
    return sample(jax_model, SCHEDULE, x_T, key, method=method, num_steps=8)

  first = run(jnp.asarray(_x_T(seed=1)), jax.random.key(0))
  second = run(jnp.asarray(_x_T(seed=2)), jax.random.key(1))
  assert not np.allclose(first, second)
  with pytest.raises(AssertionError):
    run(jnp.zeros((3, 4, 4, 3)), jax.random.key(0))  # A new shape must retrace.


def test_last_step_returns_predicted_x0_exactly():
  _, trajectory = sample(jax_model, SCHEDULE, _x_T(), jax.random.key(0), method="ddim",
                         num_steps=10, return_trajectory=True)
  x_1 = trajectory[-2]
  ab = SCHEDULE.alphas_cumprod[0]  # The last leading grid entry is t = 0.
  x0 = (x_1 - jnp.sqrt(1 - ab) * jax_model(x_1, jnp.zeros((2,), jnp.int32))) / jnp.sqrt(ab)
  np.testing.assert_array_equal(trajectory[-1], x0)
  assert trajectory.shape == (11, 2, 4, 4, 3)


def test_model_receives_float32_fractional_timesteps():
  seen = []

  def model_fn(x, t):
    seen.append(t)
    return jax_model(x, t)

  sample(model_fn, SCHEDULE, _x_T(), jax.random.key(0), method="euler", num_steps=7)
  assert seen[0].dtype == jnp.float32


def test_noise_depends_only_on_each_examples_key():
  keys = jax.random.split(jax.random.key(7), 4)
  x_T = _x_T((4, 4, 4, 3))
  run = jax.jit(lambda x, k: sample(jax_model, SCHEDULE, x, k, method="ddpm", num_steps=5))
  full, half = run(x_T, keys), run(x_T[2:], keys[2:])
  np.testing.assert_allclose(full[2:], half, rtol=1e-6, atol=1e-6)
  assert not np.allclose(full[:2], full[2:])
  folded = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(4))
  np.testing.assert_array_equal(jax.random.key_data(samplers.example_keys(jax.random.key(7), 4)),
                                jax.random.key_data(folded))



def test_low_precision_model_output_keeps_float32():
  bf16_model = lambda x, t: jax_model(x, t).astype(jnp.bfloat16)
  out = sample(bf16_model, SCHEDULE, _x_T(), jax.random.key(0), method="ddim", num_steps=3)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("options, match", [
    (dict(method="foo"), "method='foo' is unknown"),
    (dict(num_steps=2000), "num_steps=2000 exceeds schedule.num_timesteps=1000"),
    (dict(eta=-0.1), "eta=-0.1 must be >= 0"),
    (dict(spacing="middle"), "spacing='middle'"),
    (dict(prediction="score"), "prediction='score'"),
    (dict(variance="tiny"), "variance='tiny'"),
    (dict(method="ddim", karras_sigmas=True), "karras_sigmas=True is not available"),
    (dict(method="heun", final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
    (dict(method="unipc", solver_order=4), "solver_order=4"),
    (dict(guidance_rescale=0.7), "need a guidance_scale"),
])
def test_bad_arguments(options, match):
  kwargs = dict(method="ddim", num_steps=10) | options
  with pytest.raises(ValueError, match=match):
    sample(jax_model, SCHEDULE, _x_T(), jax.random.key(0), **kwargs)
