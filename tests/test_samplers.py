"""Samplers against diffusers' schedulers, a Gaussian closed form, and their own Python loop."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from jaxdiff.diffusion import classifier_free_guidance, make_schedule, sample, timesteps
from jaxdiff.diffusion import samplers

T = 1000
SCHEDULE = make_schedule("linear", T)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SLOPE = 1.3


def jax_model(x, t):
  """A nonlinear stand-in for a network: tanh(1.3 x + t / 1000), elementwise."""
  return jnp.tanh(SLOPE * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0)


def torch_model(x, t):
  return torch.tanh(SLOPE * x + float(t) / 1000.0)


def _x_T(shape=(2, 4, 4, 3), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _diffusers_trajectory(scheduler, x_T):
  x = torch.from_numpy(x_T)
  trajectory = [x]
  for t in scheduler.timesteps:
    x = scheduler.step(torch_model(x, t), t, x).prev_sample
    trajectory.append(x)
  return torch.stack(trajectory).numpy()


@pytest.mark.parametrize("spacing, prediction, set_alpha_to_one", [
    ("leading", "eps", True), ("trailing", "v", True), ("leading", "x0", False)])
def test_ddim_trajectory_matches_diffusers(spacing, prediction, set_alpha_to_one):
  x_T = _x_T()
  ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing=spacing,
                      set_alpha_to_one=set_alpha_to_one,
                      prediction_type=DIFFUSERS_PREDICTION[prediction])
  ref.set_timesteps(20)
  expected = _diffusers_trajectory(ref, x_T)
  _, trajectory = sample(jax_model, SCHEDULE, x_T, jax.random.key(0), method="ddim",
                         num_steps=20, spacing=spacing, prediction=prediction,
                         set_alpha_to_one=set_alpha_to_one, return_trajectory=True)
  np.testing.assert_allclose(trajectory, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_one_ddim_step_with_eta_matches_diffusers(prediction):
  x, noise = _x_T(seed=1), _x_T(seed=2)
  ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False,
                      prediction_type=DIFFUSERS_PREDICTION[prediction])
  ref.set_timesteps(50)
  k = 10
  t = ref.timesteps[k]
  expected = ref.step(torch_model(torch.from_numpy(x), t), t, torch.from_numpy(x), eta=0.5,
                      variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
  params = samplers.step_params(SCHEDULE, timesteps(SCHEDULE, 50, "leading"))
  config = samplers.SamplerConfig(method="ddim", prediction=prediction, eta=0.5)
  state = samplers.SamplerState(jnp.asarray(x), jnp.zeros_like(x))
  out = samplers.sampler_step(jax_model, config, state, jax.tree.map(lambda a: a[k], params),
                              jnp.asarray(noise), final=False)
  np.testing.assert_allclose(out.x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing, prediction", [("trailing", "eps"), ("leading", "v")])
def test_dpmpp_2m_trajectory_matches_diffusers(spacing, prediction):
  x_T = _x_T()
  ref = DPMSolverMultistepScheduler(
      num_train_timesteps=T, solver_order=2, algorithm_type="dpmsolver++",
      timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction])
  # diffusers' DPM-Solver builds its leading grid from n + 1 points; feed it ours instead.
  ref.set_timesteps(timesteps=timesteps(SCHEDULE, 20, spacing).tolist())
  assert np.array_equal(ref.timesteps.numpy(), timesteps(SCHEDULE, 20, spacing))
  expected = _diffusers_trajectory(ref, x_T)
  _, trajectory = sample(jax_model, SCHEDULE, x_T, jax.random.key(0), method="dpmpp_2m",
                         num_steps=20, spacing=spacing, prediction=prediction,
                         return_trajectory=True)
  np.testing.assert_allclose(trajectory, expected, rtol=1e-5, atol=1e-5)


def test_dpmpp_trailing_grid_is_diffusers_own():
  ref = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="trailing")
  ref.set_timesteps(20)
  np.testing.assert_array_equal(ref.timesteps.numpy(), timesteps(SCHEDULE, 20, "trailing"))


@pytest.mark.parametrize("variance, k", [
    ("fixed_small", 3), ("fixed_large", 7), ("learned", 5), ("fixed_small", 9)])
def test_one_ddpm_step_matches_diffusers(variance, k):
  grid = timesteps(SCHEDULE, 10, "trailing")
  learned = variance == "learned"
  ref = DDPMScheduler(num_train_timesteps=T, clip_sample=False,
                      variance_type="learned_range" if learned else variance)
  ref.set_timesteps(timesteps=grid.tolist())
  x = _x_T(seed=3)
  v = np.tanh(_x_T(seed=4))
  t = ref.timesteps[k]
  output = jnp.concatenate([jax_model(x, jnp.full((2,), int(t))), v], -1) if learned else None
  torch_x = torch.from_numpy(x).permute(0, 3, 1, 2)  # diffusers splits variance on axis 1.
  torch_out = torch_model(torch_x, t)
  if learned:
    torch_out = torch.cat([torch_out, torch.from_numpy(v).permute(0, 3, 1, 2)], 1)
  generator = torch.Generator().manual_seed(0)
  expected = ref.step(torch_out, t, torch_x, generator=generator).prev_sample
  noise = torch.randn(torch_x.shape, generator=torch.Generator().manual_seed(0))
  model_fn = (lambda x_, t_: output) if learned else jax_model
  params = jax.tree.map(lambda a: a[k], samplers.step_params(SCHEDULE, grid))
  config = samplers.SamplerConfig(method="ddpm", variance=variance)
  out = samplers.sampler_step(
      model_fn, config, samplers.SamplerState(jnp.asarray(x), jnp.zeros_like(x)), params,
      jnp.asarray(noise.permute(0, 2, 3, 1).numpy()), final=False)
  np.testing.assert_allclose(out.x, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


MU, STD = 0.4, 0.3


def _gaussian_model(prediction, learned_variance=False):
  """The exact prediction for data N(MU, STD²): E[ε | x_t] in closed form, elementwise.

  x_t ~ N(sqrt(ᾱ) MU, ᾱ STD² + 1 - ᾱ), so
  E[ε | x_t] = sqrt(1-ᾱ) (x_t - sqrt(ᾱ) MU) / (ᾱ STD² + 1 - ᾱ)
  and E[x_0 | x_t] = MU + sqrt(ᾱ) STD² (x_t - sqrt(ᾱ) MU) / (ᾱ STD² + 1 - ᾱ).
  """
  def model_fn(x, t):
    ab = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    residual = (x - jnp.sqrt(ab) * MU) / (ab * STD**2 + 1 - ab)
    eps, x0 = jnp.sqrt(1 - ab) * residual, MU + jnp.sqrt(ab) * STD**2 * residual
    out = {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[prediction]
    return jnp.concatenate([out, jnp.zeros_like(out)], -1) if learned_variance else out
  return model_fn


@pytest.mark.parametrize("method, num_steps, options", [
    ("ddpm", 1000, dict(variance="fixed_small")),
    ("ddpm", 1000, dict(variance="learned")),
    ("ddim", 1000, dict(prediction="x0")),
    ("dpmpp_2m", 50, dict(spacing="trailing")),
    ("dpmpp_2m", 50, dict(spacing="trailing", prediction="v")),
    ("heun", 50, dict()),
])
def test_gaussian_data_is_recovered(method, num_steps, options):
  """4096 samples driven by the exact prediction must have mean MU and std STD."""
  x_T = jax.random.normal(jax.random.key(0), (128, 8, 4, 1))
  # Standardising x_T removes the sampling error of the deterministic samplers.
  x_T = (x_T - x_T.mean()) / x_T.std()
  model_fn = _gaussian_model(options.get("prediction", "eps"),
                             options.get("variance") == "learned")
  x = np.asarray(sample(model_fn, SCHEDULE, x_T, jax.random.key(1), method=method,
                        num_steps=num_steps, **options), np.float64)
  stochastic = method == "ddpm" or options.get("eta", 0) > 0
  # 4.3 standard errors (STD/64 for the mean, STD/90 for the std) when noise is drawn.
  mean_tol, std_tol = (0.02, 0.015) if stochastic else (0.01, 0.01)
  assert abs(x.mean() - MU) < mean_tol
  assert abs(x.std() - STD) < std_tol


def _one_step(method, model_fn, k=4, **options):
  x, noise = jnp.asarray(_x_T(seed=8)), jnp.asarray(_x_T(seed=9))
  params = jax.tree.map(lambda a: a[k], samplers.step_params(SCHEDULE, timesteps(SCHEDULE, 10)))
  config = samplers.SamplerConfig(method=method, **options)
  state = samplers.SamplerState(x, jnp.zeros_like(x))
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


def _python_loop(model_fn, x_T, key, method, num_steps, **options):
  """The same step function, called step by step from Python."""
  config = samplers.SamplerConfig(method=method, lower_order_final=True, **options)
  params = samplers.step_params(SCHEDULE, timesteps(SCHEDULE, num_steps, "leading"))
  keys = samplers.example_keys(key, x_T.shape[0])
  state = samplers.SamplerState(jnp.asarray(x_T), jnp.zeros_like(x_T))
  for k in range(num_steps):
    final = k == num_steps - 1
    noise = samplers.step_noise(keys, k, x_T.shape) if samplers.needs_noise(config, final) else None
    state = samplers.sampler_step(model_fn, config, state, jax.tree.map(lambda a: a[k], params),
                                  noise, final=final)
  return state.x


@pytest.mark.parametrize("method, options", [
    ("ddpm", {}), ("dpmpp_2m", {}), ("heun", {})])
def test_scan_equals_python_loop(method, options):
  x_T = _x_T()
  expected = _python_loop(jax_model, x_T, jax.random.key(5), method, 6, **options)
  got = sample(jax_model, SCHEDULE, x_T, jax.random.key(5), method=method, num_steps=6,
               **options)
  # Same arithmetic; only XLA's fusion of the scan body may reassociate float32 operations.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_compiles_once_per_shape():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x_T, key):
    return sample(jax_model, SCHEDULE, x_T, key, method="ddim", num_steps=8)

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


def test_classifier_free_guidance_convention():
  """First half conditional, second half unconditional; variance channels from the first half."""
  calls = []

  def model_fn(x, t):
    calls.append(x.shape[0])
    half = x.shape[0] // 2
    sign = jnp.concatenate([jnp.ones(half), -jnp.ones(half)])[:, None, None, None]
    return jnp.concatenate([jax_model(x, t) * (1 + sign), 2 + sign * jnp.ones_like(x)], -1)

  x, t = jnp.asarray(_x_T()), jnp.array([10, 500])
  out = classifier_free_guidance(model_fn, 3.0, 3)(x, t)
  cond, uncond = 2 * jax_model(x, t), 0 * jax_model(x, t)
  np.testing.assert_allclose(out[..., :3], uncond + 3.0 * (cond - uncond), rtol=1e-6)
  np.testing.assert_array_equal(out[..., 3:], 3 * jnp.ones_like(x))
  assert calls == [4]


def test_sample_with_guidance_equals_guided_model():
  cond_model = lambda x, t: jax_model(x, t) * 1.5
  doubled = lambda x, t: jnp.concatenate([cond_model(x[:2], t[:2]), jax_model(x[2:], t[2:])])
  guided = lambda x, t: jax_model(x, t) + 4.0 * (cond_model(x, t) - jax_model(x, t))
  kwargs = dict(method="dpmpp_2m", num_steps=5)
  a = sample(doubled, SCHEDULE, _x_T(), jax.random.key(0), guidance_scale=4.0, **kwargs)
  b = sample(guided, SCHEDULE, _x_T(), jax.random.key(0), **kwargs)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


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
])
def test_bad_arguments(options, match):
  kwargs = dict(method="ddim", num_steps=10) | options
  with pytest.raises(ValueError, match=match):
    sample(jax_model, SCHEDULE, _x_T(), jax.random.key(0), **kwargs)
