"""Layers shared by the U-Net, the DiT and the autoencoder."""

import math
from typing import Any

import flax.linen as nn
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
