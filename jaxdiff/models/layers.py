"""Layers shared by the U-Net, the DiT, the autoencoder and the text models."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(
    t: jnp.ndarray,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    scale: float = 1.0,
) -> jnp.ndarray:
  """Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM appendix B), always float32.

  freqs_i = exp(-log(max_period) * i / (dim // 2 - freq_shift)), i = 0 .. dim // 2 - 1, and the
  embedding is [sin(t * freqs), cos(t * freqs)], or [cos, sin] when `flip_sin_to_cos`.
  The conventions differ between codebases and matter for weight import:
  original DiT and diffusers' UNet2DModel use flip_sin_to_cos=True, freq_shift=0; diffusers'
  DiT (`CombinedTimestepLabelEmbeddings`) uses flip_sin_to_cos=True, freq_shift=1.

  Args:
    t: [B] timesteps, int or float (fractional timesteps are allowed). Cast to float32 here so
      a bfloat16 model never rounds 998.4 to 1000.
    dim: embedding width; an odd width is zero-padded by one column.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# DDPM's variance_scaling(1, fan_avg, uniform), used by the U-Net and the autoencoder.
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def kernel_init(zero: bool):
  """DDPM's kernel initialiser, or zeros for layers that start as the identity's residual."""
  return nn.initializers.zeros_init() if zero else KERNEL_INIT


def group_norm(groups: int, eps: float, dtype: Any, param_dtype: Any, name: str) -> nn.GroupNorm:
  """GroupNorm with PyTorch's numerics (statistics in at least float32)."""
  # Two-pass variance: E[x^2] - E[x]^2 loses digits against PyTorch's GroupNorm.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Any, param_dtype: Any, name: str, *,
         stride: int = 1, padding=None, zero: bool = False) -> nn.Conv:
  """Square conv, 'same' padding by default (kernel // 2 on every side), DDPM init."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init(zero), name=name)


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, mask: jnp.ndarray | None = None,
              is_causal: bool = False) -> jnp.ndarray:
  """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017,
  eq. 1), the one attention core of every model here.

  The same function as `jax.nn.dot_product_attention`'s XLA path (logits and softmax in
  float32), written for XLA:CPU's matmuls: heads lead the operands ([B, H, T, D] queries times
  [B, H, D, S] keys), and the softmax normalisation is applied after the second matmul (to
  [T, D] instead of [T, S] values). On a 2-core Xeon this runs a DiT-S/2 attention layer
  (B=4, T=256, 6 heads of 64) about twice as fast as jax.nn's [B, T, H, D] einsums
  (experiments/README.md, "Sampling speed").

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, H, D] keys.
    v: [B, S, H, D] values.
    mask: [B, S] bool, False for keys to ignore (padding), or None.
    is_causal: query i attends only to keys j <= i (needs T == S).

  Returns:
    [B, T, H, D] in v's dtype.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bhtd,bhds->bhts", jnp.transpose(q, (0, 2, 1, 3)),
                      jnp.transpose(k, (0, 2, 3, 1)), preferred_element_type=jnp.float32)
  logits = logits * scale
  keep = None
  if mask is not None:
    keep = mask[:, None, None, :].astype(bool)
  if is_causal:
    length = logits.shape[-1]
    causal = jnp.tril(jnp.ones((logits.shape[-2], length), bool))
    keep = causal if keep is None else keep & causal
  if keep is not None:
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), jnp.transpose(v, (0, 2, 1, 3)),
                   preferred_element_type=jnp.float32)
  out = out / weights.sum(-1, keepdims=True)
  return jnp.transpose(out, (0, 2, 1, 3)).astype(v.dtype)
