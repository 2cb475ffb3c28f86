"""Classifier-free guidance (Ho & Salimans 2022) as one wrapper around a model function, with the
guidance interval (Kynkäänniemi et al. 2024) and CFG rescale (Lin et al. 2024), both off by
default. Everything is traceable, so the wrapper runs inside the samplers' `lax.scan`."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def rescale_guidance(guided: jax.Array, cond: jax.Array, phi: float) -> jax.Array:
  """CFG rescale (Lin et al. 2024, Alg. 2): x̃ = φ x_cfg std(x_c) / std(x_cfg) + (1 - φ) x_cfg,
  standard deviations per example over all non-batch axes ([B, ...] in and out)."""
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
  return phi * guided * ratio + (1.0 - phi) * guided


def classifier_free_guidance(model_fn: ModelFn, guidance_scale: float,
                             num_prediction_channels: int, *,
                             interval: tuple[float, float] | None = None,
                             rescale: float = 0.0) -> ModelFn:
  """Wraps `model_fn` so that each call evaluates the conditional and unconditional model at once.

  Convention: the wrapped function receives x [B, H, W, C] and t [B] and calls `model_fn` once on
  the doubled batch `[x; x]`, `[t; t]` ([2B, ...]). `model_fn` must evaluate the first B rows with
  their labels (conditional) and the last B rows with the null label (unconditional). The guided
  prediction is ε̃ = ε_u + s (ε_c - ε_u) (eq. 6, with s = 1 + w), applied to the first
  `num_prediction_channels` output channels only; any further channels (learned variance) are
  taken from the conditional half.

  Args:
    model_fn: `(x [2B,...], t [2B]) -> [2B, ..., C_out]`.
    guidance_scale: s; 1 gives the conditional model, 0 the unconditional one.
    num_prediction_channels: number of leading output channels to guide.
    interval: (t_low, t_high): guide only examples whose timestep (as the model receives it) lies
      in [t_low, t_high]; elsewhere return the conditional prediction. Kynkäänniemi et al. state
      the interval in σ; since σ grows with t, the same interval in t is equivalent.
    rescale: φ of CFG rescale, applied to the guided prediction (0: off, Lin et al. use 0.7).

  Returns:
    `(x [B,...], t [B]) -> [B, ..., C_out]` float32.
  """
  if interval is not None and not interval[0] <= interval[1]:
    raise ValueError(f"guidance_interval={interval} must be (low, high) with low <= high")
  if not 0.0 <= rescale <= 1.0:
    raise ValueError(f"guidance_rescale={rescale} must be in [0, 1]")

  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t])).astype(jnp.float32)
    cond, uncond = jnp.split(out, 2, axis=0)
    pred_cond = cond[..., :num_prediction_channels]
    pred_uncond = uncond[..., :num_prediction_channels]
    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    if rescale:
      pred = rescale_guidance(pred, pred_cond, rescale)
    if interval is not None:
      inside = (t >= interval[0]) & (t <= interval[1])
      pred = jnp.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), pred, pred_cond)
    return jnp.concatenate([pred, cond[..., num_prediction_channels:]], axis=-1)

  return guided
