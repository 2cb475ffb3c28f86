"""The DDPM variational bound in bits per dimension (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021).

L = L_T + Σ_{t>0} L_{t-1} + L_0 with L_T = KL(q(x_T | x_0) ‖ N(0, I)),
L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)) and L_0 = -log p(x_0 | x_1) under the
discretized Gaussian decoder (eq. 13). In code t runs over 0..T-1, so the decoder term is at t = 0.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from jaxdiff.diffusion import targets
from jaxdiff.diffusion.samplers import example_keys, step_noise
from jaxdiff.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
_LOG2 = math.log(2.0)


def normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
  """Elementwise KL(N(mean1, e^{log_var1}) ‖ N(mean2, e^{log_var2})) in nats."""
  return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                + (mean1 - mean2)**2 * jnp.exp(-log_var2))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array,
                                        log_scale: jax.Array) -> jax.Array:
  """log P(x) of 8-bit data under N(mean, e^{2 log_scale}) integrated over x's bin (eq. 13).

  x in [-1, 1] takes 256 values 2k/255 - 1; bins have half-width 1/255 and the end bins extend to
  ±∞. Uses the exact normal CDF (ADM uses a tanh approximation of it).

  Args:
    x: [...] data on the 8-bit grid.
    mean: [...] decoder mean.
    log_scale: [...] log standard deviation.

  Returns:
    [...] log-likelihood in nats, floored at log(1e-12) as in ADM.
  """
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + 1.0 / 255.0)
  lower = inv_std * (x - mean - 1.0 / 255.0)
  # Φ(b) - Φ(a) loses all digits when both are near 1; use the mirrored tail there.
  delta = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
  log_middle = jnp.log(jnp.maximum(delta, 1e-12))
  return jnp.where(x < -0.999, log_ndtr(upper), jnp.where(x > 0.999, log_ndtr(-lower), log_middle))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def p_mean_log_variance(schedule: Schedule, output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                        prediction: str = "eps", variance: str = "fixed_small",
                        clip_denoised: bool = False):
  """Mean and log variance of p(x_{t-1} | x_t) = N(μ̃_t(x_t, x̂_0), Σ_t).

  Args:
    schedule: the schedule.
    output: [B, ..., C] model prediction, or [B, ..., 2C] with `variance="learned"`, whose extra
      channels v in [-1, 1] give log Σ = f log β_t + (1 - f) log β̃_t (clipped), f = (v + 1) / 2.
    x_t: [B, ..., C].
    t: [B] int timesteps.
    prediction: `eps | x0 | v`.
    variance: `fixed_small` (log β̃_t clipped), `fixed_large` (log β_t, with β̃_1 at t = 0, as ADM)
      or `learned`.
    clip_denoised: clip x̂_0 to [-1, 1].

  Returns:
    (mean [B,...,C], log_variance broadcastable to it, x̂_0 [B,...,C]).
  """
  channels = x_t.shape[-1]
  alpha_bar = schedule.alphas_cumprod[t]
  x0, _ = targets.x0_and_eps(prediction, output[..., :channels], x_t, alpha_bar)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean = (targets.extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + targets.extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  log_small = targets.extract(schedule.posterior_log_variance_clipped, t, x_t)
  log_large = targets.extract(jnp.log(schedule.betas).at[0].set(
      jnp.log(schedule.posterior_variance[1])), t, x_t)
  if variance == "fixed_small":
    return mean, log_small, x0
  if variance == "fixed_large":
    return mean, log_large, x0
  if variance != "learned":
    raise ValueError(f"variance={variance!r} is unknown; choose fixed_small, fixed_large, learned")
  if output.shape[-1] != 2 * channels:
    raise ValueError("variance='learned' needs a model output with 2C channels")
  frac = (output[..., channels:] + 1.0) / 2.0
  # β_t itself (not the t = 0 substitute) is the upper end of the learned range, as in ADM.
  log_beta = targets.extract(jnp.log(schedule.betas), t, x_t)
  return mean, frac * log_beta + (1.0 - frac) * log_small, x0


def vlb_term(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array, mean: jax.Array,
             log_variance: jax.Array) -> jax.Array:
  """L_{t-1} in bits per dimension [B]: the KL term for t > 0, the decoder NLL at t = 0."""
  true_mean = (targets.extract(schedule.posterior_mean_coef1, t, x0) * x0
               + targets.extract(schedule.posterior_mean_coef2, t, x0) * x_t)
  true_log_var = targets.extract(schedule.posterior_log_variance_clipped, t, x0)
  kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_variance)) / _LOG2
  nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, mean, 0.5 * jnp.broadcast_to(log_variance, x0.shape))) / _LOG2
  return jnp.where(t == 0, nll, kl)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits per dimension [B]."""
  alpha_bar = schedule.alphas_cumprod[-1]
  kl = normal_kl(jnp.sqrt(alpha_bar) * x0, jnp.log1p(-alpha_bar), 0.0, 0.0)
  return mean_flat(kl) / _LOG2


def vlb_terms(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, key: jax.Array, *,
              prediction: str = "eps", learn_sigma: bool = False,
              variance: str = "fixed_small", clip_denoised: bool = False) -> dict[str, jax.Array]:
  """Every term of the variational bound, with one `lax.scan` over t = 0..T-1.

  Args:
    model_fn: `(x_t [B,...,C], t int32 [B]) -> [B,...,C or 2C]`.
    schedule: the schedule.
    x0: [B, ..., C] data in [-1, 1] from 8-bit images.
    key: one key or per-example keys [B]; x_t of example i at step t uses fold_in(key_i, t).
    prediction: `eps | x0 | v`.
    learn_sigma: the model outputs 2C channels with learned variance (overrides `variance`).
    variance: `fixed_small | fixed_large` for models without learned variance.
    clip_denoised: clip x̂_0 to [-1, 1] (ADM evaluates with clipping on).

  Returns:
    {"prior_bpd": [B], "terms_bpd": [B, T] (L_{t-1} at column t), "total_bpd": [B]}.
  """
  targets.check_prediction(prediction)
  x0 = jnp.asarray(x0, jnp.float32)
  keys = example_keys(key, x0.shape[0])
  variance = "learned" if learn_sigma else variance

  def term(carry, t):
    t_batch = jnp.full((x0.shape[0],), t, jnp.int32)
    x_t = targets.q_sample(schedule, x0, t_batch, step_noise(keys, t, x0.shape))
    output = model_fn(x_t, t_batch).astype(jnp.float32)
    mean, log_var, _ = p_mean_log_variance(
        schedule, output, x_t, t_batch, prediction=prediction, variance=variance,
        clip_denoised=clip_denoised)
    return carry, vlb_term(schedule, x0, x_t, t_batch, mean, log_var)

  _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
  prior = prior_bpd(schedule, x0)
  return {"prior_bpd": prior, "terms_bpd": terms.T, "total_bpd": prior + jnp.sum(terms, axis=0)}


def bits_per_dim(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, key: jax.Array,
                 **options) -> jax.Array:
  """The full variational bound in bits per dimension [B]; `options` as in `vlb_terms`."""
  return vlb_terms(model_fn, schedule, x0, key, **options)["total_bpd"]
