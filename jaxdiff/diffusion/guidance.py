"""Classifier-free guidance (Ho & Salimans 2022) as one wrapper around a model function."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(model_fn: ModelFn, guidance_scale: float,
                             num_prediction_channels: int) -> ModelFn:
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

  Returns:
    `(x [B,...], t [B]) -> [B, ..., C_out]` float32.
  """
  def guided(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t])).astype(jnp.float32)
    cond, uncond = jnp.split(out, 2, axis=0)
    pred_cond = cond[..., :num_prediction_channels]
    pred_uncond = uncond[..., :num_prediction_channels]
    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    return jnp.concatenate([pred, cond[..., num_prediction_channels:]], axis=-1)

  return guided
