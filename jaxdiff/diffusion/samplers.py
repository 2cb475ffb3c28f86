"""Samplers: one step function per method, driven by a single `lax.scan` over the timestep grid.

Each step maps x at grid timestep t_k to x at t_{k+1} (the next grid entry, read from the grid
itself). After the last grid entry the sampler lands on ᾱ = 1 (diffusers' `set_alpha_to_one=True`,
which makes the last step return the predicted x_0 exactly) or on ᾱ_0 (`set_alpha_to_one=False`).
With respacing the model is always fed the original integer timesteps of the grid.

The scan runs the first n-1 steps with a fixed-shape carry (x, last x_0 prediction); the last step
is the same step function specialised at trace time (`final=True`), so nothing on the hot path
branches with `lax.cond` and nothing leaves the device.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import targets
from jaxdiff.diffusion.guidance import classifier_free_guidance
from jaxdiff.diffusion.schedules import Schedule, timesteps

METHODS = ("ddpm", "ddim", "dpmpp_2m", "heun")
VARIANCES = ("fixed_small", "fixed_large", "learned")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler options (see `sample`)."""
  method: str = "ddim"
  prediction: str = "eps"
  eta: float = 0.0
  variance: str = "fixed_small"
  clip_denoised: bool = False
  set_alpha_to_one: bool = True
  # DPM-Solver++ falls back to first order on the last step (diffusers' `lower_order_final`).
  lower_order_final: bool = True


class StepParams(NamedTuple):
  """Per-step scalars; `step_params` stacks them to [n] arrays for the scan."""
  index: jax.Array  # int32, step number k (folded into the noise keys).
  t: jax.Array  # int32, timestep fed to the model.
  t_next: jax.Array  # int32, timestep the step lands on (0 after the last grid entry).
  alpha_bar: jax.Array  # float32, ᾱ at t.
  alpha_bar_next: jax.Array  # float32, ᾱ where the step lands.
  alpha_bar_before: jax.Array  # float32, ᾱ at the previous grid entry (= alpha_bar at k = 0).


class SamplerState(NamedTuple):
  """The scan carry: x [B, ...] and the previous x_0 prediction [B, ...] (DPM-Solver++ history)."""
  x: jax.Array
  denoised: jax.Array


def step_params(schedule: Schedule, grid, set_alpha_to_one: bool = True) -> StepParams:
  """Stacks the per-step scalars of a descending int grid [n] into [n] arrays."""
  grid = jnp.asarray(grid, jnp.int32)
  alpha_bar = schedule.alphas_cumprod[grid]
  final = jnp.ones((1,), jnp.float32) if set_alpha_to_one else schedule.alphas_cumprod[:1]
  return StepParams(
      index=jnp.arange(grid.shape[0], dtype=jnp.int32), t=grid,
      t_next=jnp.concatenate([grid[1:], jnp.zeros((1,), jnp.int32)]),
      alpha_bar=alpha_bar, alpha_bar_next=jnp.concatenate([alpha_bar[1:], final]),
      alpha_bar_before=jnp.concatenate([alpha_bar[:1], alpha_bar[:-1]]))


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """Per-example keys [B]: `key` itself if it already holds B keys, else fold_in(key, i)."""
  is_typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (1 if is_typed else 2):
    if key.shape[0] != batch_size:
      raise ValueError(f"key holds {key.shape[0]} keys but x_T has batch size {batch_size}")
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def step_noise(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal noise [B, ...] of step `index`; row i comes only from keys[i]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:]))(keys)


def _denoise(model_fn: ModelFn, config: SamplerConfig, x: jax.Array, t: jax.Array,
             alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Calls the model at integer timestep t; returns (x_0, ε, variance channels), float32."""
  out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32)).astype(jnp.float32)
  channels = x.shape[-1]
  if out.shape[-1] not in (channels, 2 * channels):
    raise ValueError(f"model output has {out.shape[-1]} channels; expected {channels} or "
                     f"{2 * channels} (learned variance)")
  x0, eps = targets.x0_and_eps(config.prediction, out[..., :channels], x, alpha_bar)
  if config.clip_denoised:
    # As ADM: clip x_0 to [-1, 1] and re-derive ε from it, so the step stays consistent.
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = targets.eps_from_x0(x, x0, alpha_bar)
  return x0, eps, out[..., channels:]


def _ddim_step(model_fn, config, state, p, noise, final):
  """DDIM (Song et al. 2021, eq. 12): x' = sqrt(ᾱ') x̂_0 + sqrt(1 - ᾱ' - σ²) ε̂ + σ z,
  σ = η sqrt((1 - ᾱ') / (1 - ᾱ) (1 - ᾱ / ᾱ')) (eq. 16)."""
  del final
  x0, eps, _ = _denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  sigma = config.eta * jnp.sqrt((1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next))
  x = jnp.sqrt(ab_next) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_next - sigma**2, 0.0)) * eps
  if noise is not None:
    x = x + sigma * noise
  return SamplerState(x, x0)


def _ddpm_step(model_fn, config, state, p, noise, final):
  """Ancestral step from p(x' | x) = N(μ̃(x, x̂_0), Σ) (Ho et al. eq. 6-7) between grid points,
  with β = 1 - ᾱ / ᾱ'. Σ is β̃ (fixed_small), β (fixed_large) or exp(f log β + (1 - f) log β̃),
  f = (v + 1) / 2 from the model's extra channels (learned, Nichol & Dhariwal eq. 15)."""
  x0, _, var_values = _denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  beta = 1.0 - ab / ab_next
  mean = (jnp.sqrt(ab_next) * beta / (1.0 - ab)) * x0 + (
      jnp.sqrt(1.0 - beta) * (1.0 - ab_next) / (1.0 - ab)) * state.x
  if final or noise is None:  # No noise is added on the last step (ADM's t = 0 mask).
    return SamplerState(mean, x0)
  # Clamped as diffusers does, since β̃ = 0 where ᾱ' = 1.
  log_small = jnp.log(jnp.maximum(beta * (1.0 - ab_next) / (1.0 - ab), 1e-20))
  log_large = jnp.log(beta)
  if config.variance == "fixed_small":
    log_var = log_small
  elif config.variance == "fixed_large":
    log_var = log_large
  else:
    if var_values.shape != state.x.shape:
      raise ValueError("variance='learned' needs a model with 2C output channels")
    frac = (var_values + 1.0) / 2.0
    log_var = frac * log_large + (1.0 - frac) * log_small
  return SamplerState(mean + jnp.exp(0.5 * log_var) * noise, x0)


def _log_snr(alpha_bar):
  """λ = log(α / σ) = ½ log(ᾱ / (1 - ᾱ))."""
  return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


def _dpmpp_2m_step(model_fn, config, state, p, noise, final):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form):
  x' = (σ'/σ) x + α' (1 - e^{-h}) D, h = λ' - λ, D = x̂_0 + (x̂_0 - x̂_0^{prev}) / (2r),
  r = h_prev / h. First order (D = x̂_0) on the first step and, with `lower_order_final`, on
  the last."""
  del noise
  x0, _, _ = _denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  alpha, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  alpha_next, sigma_next = jnp.sqrt(ab_next), jnp.sqrt(1.0 - ab_next)
  decay = (sigma_next * alpha) / (alpha_next * sigma)  # e^{-h}, finite even when σ' = 0.
  if final and config.lower_order_final:
    direction = x0
  else:
    log_snr = _log_snr(ab)
    ratio = (log_snr - _log_snr(p.alpha_bar_before)) / (_log_snr(ab_next) - log_snr)
    coef = jnp.where(p.index == 0, 0.0, 0.5 / ratio)  # Scalar select: no history at k = 0.
    direction = x0 + coef * (x0 - state.denoised)
  x = (sigma_next / sigma) * state.x + alpha_next * (1.0 - decay) * direction
  return SamplerState(x, x0)


def _heun_step(model_fn, config, state, p, noise, final):
  """Heun's 2nd-order method on the probability-flow ODE in EDM form (Karras et al. 2022, Alg. 1):
  y = x / sqrt(ᾱ), σ = sqrt((1 - ᾱ) / ᾱ), dy/dσ = (y - D(y; σ)) / σ, D = x̂_0. Both evaluations
  are at integer grid timesteps (t, then t_next), so the model never sees fractional timesteps;
  the step to σ' = 0 (last step with `set_alpha_to_one`) is Euler and returns x̂_0 exactly."""
  del noise
  x0, _, _ = _denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  if final and config.set_alpha_to_one:
    return SamplerState(x0, x0)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  sigma, sigma_next = jnp.sqrt((1.0 - ab) / ab), jnp.sqrt((1.0 - ab_next) / ab_next)
  y = state.x / jnp.sqrt(ab)
  slope = (y - x0) / sigma
  y_euler = y + (sigma_next - sigma) * slope
  x0_next, _, _ = _denoise(model_fn, config, y_euler * jnp.sqrt(ab_next), p.t_next, ab_next)
  slope_next = (y_euler - x0_next) / sigma_next
  y_next = y + (sigma_next - sigma) * 0.5 * (slope + slope_next)
  return SamplerState(y_next * jnp.sqrt(ab_next), x0)


_STEPS = {"ddpm": _ddpm_step, "ddim": _ddim_step, "dpmpp_2m": _dpmpp_2m_step, "heun": _heun_step}


def needs_noise(config: SamplerConfig, final: bool) -> bool:
  """Whether a step draws noise (decided at trace time)."""
  if config.method == "ddpm":
    return not final
  return config.method == "ddim" and config.eta > 0


def sampler_step(model_fn: ModelFn, config: SamplerConfig, state: SamplerState, params: StepParams,
                 noise: jax.Array | None, *, final: bool) -> SamplerState:
  """One step of `config.method` from grid entry k to k+1.

  Args:
    model_fn: `(x [B,...], t int32 [B]) -> prediction [B,...,C or 2C]`.
    config: static options.
    state: the carry at step k.
    params: the scalars of step k (one slice of `step_params`).
    noise: [B, ...] standard normal, or None when `needs_noise` is False.
    final: whether this is the last step (static).

  Returns:
    The carry at step k+1.
  """
  return _STEPS[config.method](model_fn, config, state, params, noise, final)


def _validate(schedule, method, num_steps, eta, prediction, variance):
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be an integer >= 1")
  if num_steps > schedule.num_timesteps:
    raise ValueError(
        f"num_steps={num_steps} exceeds schedule.num_timesteps={schedule.num_timesteps}")
  if eta < 0:
    raise ValueError(f"eta={eta} must be >= 0")
  targets.check_prediction(prediction)
  if variance not in VARIANCES:
    raise ValueError(f"variance={variance!r} is unknown; choose one of {VARIANCES}")


def sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, key: jax.Array, *,
           method: str, num_steps: int, eta: float = 0.0, spacing: str = "leading",
           prediction: str = "eps", clip_denoised: bool = False,
           guidance_scale: float | None = None, variance: str = "fixed_small",
           set_alpha_to_one: bool = True, return_trajectory: bool = False):
  """Draws samples by integrating the reverse process from x_T.

  Args:
    model_fn: `(x_t [B,...,C], t int32 [B]) -> [B,...,C]` prediction of type `prediction`, or
      `[B,...,2C]` with learned-variance channels (used by `ddpm` with `variance="learned"`,
      ignored otherwise). Any dtype; the sampler casts it to float32 and computes in float32.
      With `guidance_scale`, `model_fn` is called on the doubled batch `[x; x]`, `[t; t]` and must
      evaluate the first half with the labels and the second half with the null label (see
      `classifier_free_guidance`).
    schedule: the training schedule.
    x_T: [B, ...] initial noise.
    key: one PRNG key, or per-example keys [B]. The noise of example i at step k is drawn from
      fold_in(key_i, k) (key_i = fold_in(key, i) for a single key), so it does not depend on the
      batch composition or device count.
    method: `ddpm` (ancestral), `ddim` (any eta), `dpmpp_2m` (DPM-Solver++ 2M) or `heun` (EDM's
      2nd-order ODE solver on the VP schedule, 2n - 1 model calls with `set_alpha_to_one`).
    num_steps: n, the length of the timestep grid, 1 <= n <= T.
    eta: DDIM noise scale (0: deterministic, 1: DDPM-like); only used by `ddim`.
    spacing: `leading | linspace | trailing` (see `schedules.timesteps`).
    prediction: `eps | x0 | v`.
    clip_denoised: clip the predicted x_0 to [-1, 1] (and re-derive ε from it) at every step.
    guidance_scale: classifier-free guidance scale s (None: no guidance).
    variance: `fixed_small` (β̃), `fixed_large` (β) or `learned`; only used by `ddpm`.
    set_alpha_to_one: the step after the last grid entry lands on ᾱ = 1 (True, returns x̂_0 with
      eta = 0) or on ᾱ_0 (False).
    return_trajectory: also return the states.

  Returns:
    Samples [B, ...] float32, and with `return_trajectory` a trajectory [n + 1, B, ...] whose
    entry k is x after k steps (entry 0 is x_T, entry n the samples).

  Raises:
    ValueError: naming the first bad argument.
  """
  _validate(schedule, method, num_steps, eta, prediction, variance)
  if guidance_scale is not None:
    model_fn = classifier_free_guidance(model_fn, guidance_scale, x_T.shape[-1])
  config = SamplerConfig(
      method=method, prediction=prediction, eta=float(eta), variance=variance,
      clip_denoised=clip_denoised, set_alpha_to_one=set_alpha_to_one,
      lower_order_final=set_alpha_to_one or num_steps < 15)
  params = step_params(schedule, timesteps(schedule, num_steps, spacing), set_alpha_to_one)
  x_T = jnp.asarray(x_T, jnp.float32)
  keys = example_keys(key, x_T.shape[0])

  def run_step(state, p, final):
    noise = step_noise(keys, p.index, x_T.shape) if needs_noise(config, final) else None
    return sampler_step(model_fn, config, state, p, noise, final=final)

  def body(state, p):
    state = run_step(state, p, False)
    return state, state.x if return_trajectory else None

  head = jax.tree.map(lambda a: a[:-1], params)
  last = jax.tree.map(lambda a: a[-1], params)
  state, xs = jax.lax.scan(body, SamplerState(x_T, jnp.zeros_like(x_T)), head)
  state = run_step(state, last, True)
  if return_trajectory:
    return state.x, jnp.concatenate([x_T[None], xs, state.x[None]])
  return state.x
