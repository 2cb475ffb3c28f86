"""The forward process q(x_t | x_0) and conversions between ε, x_0, v and score.

All conversions follow x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε (Ho et al. 2020, eq. 4) and
v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022, sec. 4). `alpha_bar` arguments are a scalar
or a per-example [B] array; they are broadcast against the trailing axes of the images.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.schedules import Schedule

Prediction = Literal["eps", "x0", "v"]
PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> None:
  """Raises ValueError naming `prediction` if it is not one of `PREDICTIONS`."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r} is unknown; choose one of {PREDICTIONS}")


def expand(values: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a scalar or [B] array to broadcast against x [B, ...] as float32."""
  values = jnp.asarray(values, jnp.float32)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def extract(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """Gathers table[t] for t int [B] and broadcasts it against x [B, ...]."""
  return expand(table[t], x)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (eq. 4).

  Args:
    schedule: the noise schedule.
    x0: [B, ...] clean data.
    t: [B] int timesteps in [0, T-1].
    noise: [B, ...] standard normal ε.

  Returns:
    x_t: [B, ...] float32.
  """
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def x0_from_eps(x_t: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)."""
  alpha_bar = expand(alpha_bar, x_t)
  return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def eps_from_x0(x_t: jax.Array, x0: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """ε = (x_t - sqrt(ᾱ) x_0) / sqrt(1 - ᾱ)."""
  alpha_bar = expand(alpha_bar, x_t)
  return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0."""
  alpha_bar = expand(alpha_bar, x0)
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """x_0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v."""
  alpha_bar = expand(alpha_bar, x_t)
  return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) x_t."""
  alpha_bar = expand(alpha_bar, x_t)
  return jnp.sqrt(alpha_bar) * v + jnp.sqrt(1.0 - alpha_bar) * x_t


def score_from_eps(eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """∇ log q(x_t) = -ε / sqrt(1 - ᾱ) (Song et al. 2021, for the VP SDE)."""
  return -eps / jnp.sqrt(1.0 - expand(alpha_bar, eps))


def eps_from_score(score: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """ε = -sqrt(1 - ᾱ) ∇ log q(x_t)."""
  return -jnp.sqrt(1.0 - expand(alpha_bar, score)) * score


def x0_and_eps(prediction: str, output: jax.Array, x_t: jax.Array,
               alpha_bar: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Converts a model output of the given prediction type to (x_0, ε), both [B, ...]."""
  check_prediction(prediction)
  if prediction == "eps":
    return x0_from_eps(x_t, output, alpha_bar), output
  if prediction == "x0":
    return output, eps_from_x0(x_t, output, alpha_bar)
  return x0_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)


def prediction_target(prediction: str, x0: jax.Array, eps: jax.Array,
                      alpha_bar: jax.Array) -> jax.Array:
  """The regression target of a model trained to predict `prediction` ([B, ...])."""
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  return v_from_x0_eps(x0, eps, alpha_bar)


def snr(alpha_bar: jax.Array) -> jax.Array:
  """Signal-to-noise ratio SNR = ᾱ / (1 - ᾱ) (Kingma et al. 2021)."""
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return alpha_bar / (1.0 - alpha_bar)
