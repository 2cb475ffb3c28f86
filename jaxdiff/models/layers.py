"""Layers shared by the U-Net, the DiT, the autoencoder and the text models."""

import functools
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


class Dense(nn.Dense):
  """`nn.Dense` on tokens: [..., D_in] -> [..., D_out], the same parameters and numerics, with
  the leading axes flattened to one around the matmul.

  On [B, T, D] inputs the weight gradient is a dot that contracts two axes, and XLA:CPU
  materialises a transposed copy of the output gradient to feed it ([1536, 4096] for a DiT-S/2
  MLP at batch 16). On [B * T, D] it contracts one axis with no copy: a DiT-S/2 MLP pair's
  gradient ran 1.6-1.8x faster (experiments/README.md, finding 10). On accelerators the
  reshapes are free.
  """

  def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
    """inputs: [..., D_in] -> [..., features]."""
    out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return out.reshape(*inputs.shape[:-1], out.shape[-1])


# DDPM's variance_scaling(1, fan_avg, uniform), used by the U-Net and the autoencoder.
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def kernel_init(zero: bool):
  """DDPM's kernel initialiser, or zeros for layers that start as the identity's residual."""
  return nn.initializers.zeros_init() if zero else KERNEL_INIT


def _group_means(t: jnp.ndarray, groups: int) -> jnp.ndarray:
  """[B, N, C] -> [B, G]: each group's mean, summing over the positions first (a reduction over
  the major axis, the channels kept contiguous), then over each group's C / G channels."""
  per_channel = jnp.sum(t, axis=1)
  group_sums = jnp.sum(per_channel.reshape(t.shape[0], groups, -1), axis=-1)
  return group_sums / (t.shape[1] * (t.shape[2] // groups))


def _per_channel(per_group: jnp.ndarray, channels: int) -> jnp.ndarray:
  """[B, G] -> [B, 1, C], each group's value repeated over its channels."""
  return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)[:, None, :]


def _group_normalize_fwd(x, scale, bias, groups, eps):
  """Two-pass statistics of [B, N, C] float32, then (x - mean) * (inv_std * scale) + bias; the
  residuals for `_group_normalize_bwd`."""
  channels = x.shape[2]
  mean = _per_channel(_group_means(x, groups), channels)
  centred = x - mean
  inv_std = _per_channel(jax.lax.rsqrt(_group_means(centred * centred, groups) + eps), channels)
  return centred * (inv_std * scale) + bias, (centred, inv_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_normalize(x, scale, bias, groups, eps):
  return _group_normalize_fwd(x, scale, bias, groups, eps)[0]


def _group_normalize_bwd(groups, eps, residuals, dy):
  del eps
  centred, inv_std, scale = residuals
  channels = centred.shape[2]
  x_hat = centred * inv_std
  dx_hat = dy * scale
  mean_dx_hat = _per_channel(_group_means(dx_hat, groups), channels)
  mean_dx_hat_x_hat = _per_channel(_group_means(dx_hat * x_hat, groups), channels)
  dx = inv_std * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)
  return dx, jnp.sum(dy * x_hat, axis=(0, 1)), jnp.sum(dy, axis=(0, 1))


_group_normalize.defvjp(_group_normalize_fwd, _group_normalize_bwd)


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He 2018) with PyTorch's numerics: two-pass statistics in at least float32,
  y = (x - mean) * (scale / sqrt(var + eps)) + bias.

  The same function and parameters ("scale", "bias": [C]) as `flax.linen.GroupNorm(
  use_fast_variance=False)`, written for XLA:CPU: the statistics sum over the positions first
  with the channels contiguous, then over each group's channels, and the gradient is the
  closed form (dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * scale) rather
  than the autodiff of both passes. On a 2-core Xeon this runs the DDPM U-Net's GroupNorms
  several times faster than flax's reshape to [B, H, W, G, C / G] (experiments/README.md,
  finding 9).

  Input [B, ..., C] with C divisible by `num_groups`; output the same shape in `dtype` (None:
  the promoted type of the input and the parameters).
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into "
                       f"{self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    flat = x.reshape(x.shape[0], -1, channels).astype(compute_dtype)
    y = _group_normalize(flat, scale.astype(compute_dtype), bias.astype(compute_dtype),
                         self.num_groups, self.epsilon)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return y.reshape(x.shape).astype(dtype)


def group_norm(groups: int, eps: float, dtype: Any, param_dtype: Any, name: str) -> GroupNorm:
  """GroupNorm with PyTorch's numerics (statistics in at least float32)."""
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                   name=name)


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
  # The scale goes on the [T, D] queries rather than the [T, S] logits: a quarter of the work at
  # DiT's T = S = 4 D, and one fewer [T, S] pass in the backward (DiT-S/2 attention forward and
  # backward at batch 16 on XLA:CPU: 55 against 65 ms). Exact for D = 64 (a power of two).
  queries = jnp.transpose(q * jnp.asarray(scale, q.dtype), (0, 2, 1, 3))
  logits = jnp.einsum("bhtd,bhds->bhts", queries, jnp.transpose(k, (0, 2, 3, 1)),
                      preferred_element_type=jnp.float32)
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
