"""Steps of the σ-space samplers (Karras et al. 2022): y = x / sqrt(ᾱ) = x_0 + σ ε, σ² = (1-ᾱ)/ᾱ.

As diffusers' Euler, Euler ancestral and Heun schedulers: the carry is y, the model sees
y / sqrt(σ² + 1) (the VP x_t) at the step's (possibly fractional) float32 timestep, and
dy/dσ = (y - D(y; σ)) / σ with D = x̂_0 (EDM eq. 3 with s = 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.vp_steps import model_output


def denoise_sigma(model_fn, config, y: jax.Array, sigma: jax.Array, t: jax.Array) -> jax.Array:
  """D(y; σ) = x̂_0 from the model output at y / sqrt(σ² + 1), float32 [B, ...]:
  eps: y - σ ε̂; v: -σ / sqrt(σ² + 1) v̂ + y / (σ² + 1); x0: the output."""
  out, channels = model_output(model_fn, y / jnp.sqrt(sigma**2 + 1.0), t)
  out = out[..., :channels]
  if config.prediction == "eps":
    x0 = y - sigma * out
  elif config.prediction == "v":
    x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1.0)) + y / (sigma**2 + 1.0)
  else:
    x0 = out
  return jnp.clip(x0, -1.0, 1.0) if config.clip_denoised else x0


def euler_step(model_fn, config, state, p, noise, final):
  """Euler on the probability-flow ODE: y' = y + (σ' - σ) (y - D(y; σ)) / σ (EDM Alg. 1, first
  order)."""
  del noise, final
  y = state.x
  slope = (y - denoise_sigma(model_fn, config, y, p.sigma, p.t)) / p.sigma
  return state._replace(x=y + (p.sigma_next - p.sigma) * slope)


def euler_ancestral_step(model_fn, config, state, p, noise, final):
  """Euler ancestral (k-diffusion's `sample_euler_ancestral`): an Euler step down to
  σ_down = sqrt(σ'² - σ_up²), then noise σ_up z, σ_up = sqrt(σ'² (σ² - σ'²) / σ²)."""
  del final
  y, sigma, sigma_next = state.x, p.sigma, p.sigma_next
  slope = (y - denoise_sigma(model_fn, config, y, sigma, p.t)) / sigma
  sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
  sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
  y = y + (sigma_down - sigma) * slope
  if noise is not None:
    y = y + sigma_up * noise
  return state._replace(x=y)


def heun_step(model_fn, config, state, p, noise, final):
  """Heun's 2nd-order method (EDM Alg. 1 without churn): an Euler step to σ', then the average of
  the slopes at σ and σ' (the second model call at t'). The last step, to σ' = 0, is Euler, as in
  diffusers' HeunDiscreteScheduler (2n - 1 model calls)."""
  del noise
  y, sigma, sigma_next = state.x, p.sigma, p.sigma_next
  slope = (y - denoise_sigma(model_fn, config, y, sigma, p.t)) / sigma
  y_euler = y + (sigma_next - sigma) * slope
  if final:
    return state._replace(x=y_euler)
  slope_next = (y_euler - denoise_sigma(model_fn, config, y_euler, sigma_next, p.t_next)
                ) / sigma_next
  return state._replace(x=y + (sigma_next - sigma) * 0.5 * (slope + slope_next))
