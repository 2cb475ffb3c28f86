"""Steps of the variance-preserving samplers: x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε, model at t.

Each step maps the scan carry at grid entry k to entry k+1 (see `samplers.sampler_step` for the
signature); `p` holds the scalars of step k from `sampler_tables`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import targets


def model_output(model_fn, x: jax.Array, t: jax.Array) -> tuple[jax.Array, int]:
  """Calls the model at float32 timestep t (broadcast to [B]); float32 output and C."""
  out = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
  channels = x.shape[-1]
  if out.shape[-1] not in (channels, 2 * channels):
    raise ValueError(f"model output has {out.shape[-1]} channels; expected {channels} or "
                     f"{2 * channels} (learned variance)")
  return out, channels


def denoise(model_fn, config, x: jax.Array, t: jax.Array,
            alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Calls the model at timestep t; returns (x̂_0, ε̂, variance channels), float32."""
  out, channels = model_output(model_fn, x, t)
  x0, eps = targets.x0_and_eps(config.prediction, out[..., :channels], x, alpha_bar)
  if config.clip_denoised:
    # Clip x̂_0 to [-1, 1]; with `use_clipped_model_output` re-derive ε from it (as ADM), so the
    # DDIM step stays consistent; without, DDIM keeps the model's ε (diffusers' default).
    x0 = jnp.clip(x0, -1.0, 1.0)
    if config.use_clipped_model_output:
      eps = targets.eps_from_x0(x, x0, alpha_bar)
  return x0, eps, out[..., channels:]


def ddim_step(model_fn, config, state, p, noise, final):
  """DDIM (Song et al. 2021, eq. 12): x' = sqrt(ᾱ') x̂_0 + sqrt(1 - ᾱ' - σ²) ε̂ + σ z,
  σ = η sqrt((1 - ᾱ') / (1 - ᾱ) (1 - ᾱ / ᾱ')) (eq. 16)."""
  del final
  x0, eps, _ = denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  sigma = config.eta * jnp.sqrt((1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next))
  x = jnp.sqrt(ab_next) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_next - sigma**2, 0.0)) * eps
  if noise is not None:
    x = x + sigma * noise
  return state._replace(x=x)


def ddpm_step(model_fn, config, state, p, noise, final):
  """Ancestral step from p(x' | x) = N(μ̃(x, x̂_0), Σ) (Ho et al. eq. 6-7) between grid points,
  with β = 1 - ᾱ / ᾱ'. Σ is β̃ (fixed_small), β (fixed_large) or exp(f log β + (1 - f) log β̃),
  f = (v + 1) / 2 from the model's extra channels (learned, Nichol & Dhariwal eq. 15).
  The last step adds no noise (ADM); diffusers' DDPMScheduler adds noise there when the grid's
  last timestep is > 0 (trailing, linspace): std 1e-10 with fixed_small, but sqrt(β_t) with
  fixed_large, which jaxdiff does not reproduce."""
  x0, _, var_values = denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  ab, ab_next = p.alpha_bar, p.alpha_bar_next
  beta = 1.0 - ab / ab_next
  mean = (jnp.sqrt(ab_next) * beta / (1.0 - ab)) * x0 + (
      jnp.sqrt(1.0 - beta) * (1.0 - ab_next) / (1.0 - ab)) * state.x
  if final or noise is None:  # No noise is added on the last step (ADM's t = 0 mask).
    return state._replace(x=mean)
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
  return state._replace(x=mean + jnp.exp(0.5 * log_var) * noise)


def _combine(row: jax.Array, first: jax.Array, previous: jax.Array, x0: jax.Array,
             history: jax.Array) -> jax.Array:
  """row · (first, previous, x̂_0, history[0], history[1], ...) with scalar weights."""
  out = row[0] * first + row[1] * previous + row[2] * x0
  for j in range(history.shape[0]):
    out = out + row[3 + j] * history[j]
  return out


def multistep_step(model_fn, config, state, p, noise, final):
  """A linear multistep step in data-prediction form (DPM-Solver++(2M), Lu et al. 2022, Alg. 2;
  UniPC with B(h) = e^h - 1, Zhao et al. 2023, Alg. 2-3):

    x_k ← c_0 x_k + c_1 x_{k-1} + c_2 m_k + Σ_j c_{2+j} m_{k-j}   (UniC corrector; identity for
          DPM-Solver++ and at k = 0),
    x_{k+1} = p_0 x_k + p_2 m_k + Σ_j p_{2+j} m_{k-j}             (predictor),

  m_j = x̂_0 at node j, evaluated once per step at the uncorrected x_k (as diffusers does). The
  weights depend only on the grid and the step's order and come from `multistep_coefficients`.
  The carry keeps the corrected previous sample and the last three x̂_0.
  """
  del noise, final
  x0, _, _ = denoise(model_fn, config, state.x, p.t, p.alpha_bar)
  corrected = _combine(p.coefficients[0], state.x, state.previous_x, x0, state.history)
  x = _combine(p.coefficients[1], corrected, state.previous_x, x0, state.history)
  history = jnp.concatenate([x0[None], state.history[:-1]])
  return state._replace(x=x, history=history, previous_x=corrected)
