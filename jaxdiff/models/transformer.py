"""Attention and transformer blocks shared by the text-conditioned U-Net and the CLIP text encoder.

`Attention` is multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) over a
context (self-attention when the context is the input itself). `SpatialTransformer` is
diffusers' `Transformer2DModel` on continuous inputs as Stable Diffusion uses it (Rombach et al.
2022, section 3.3): GroupNorm, an input projection, `BasicTransformerBlock`s (self-attention,
cross-attention to the text, GEGLU feed-forward, each behind a LayerNorm and a residual), an
output projection and a residual around the whole.

A 1x1 convolution and a per-token linear map are the same function, so the SD 1.x layout
(`proj_in`/`proj_out` as 1x1 convs) and the SD 2.x layout (`use_linear_projection`) share this
module: both are Dense layers here, and the weight converter reshapes conv kernels.

Precision: matmuls run in `dtype`; attention logits and softmax run in float32
(`layers.attention`), which is what diffusers' `upcast_attention` asks for; norms normalise in
float32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import Dense, attention, group_norm


def _dense(features: int, dtype: Any, param_dtype: Any, name: str, *, use_bias: bool = True,
           zero: bool = False) -> Dense:
  init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
  return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=init, name=name)


def layer_norm(eps: float, dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
  """A LayerNorm with PyTorch's two-pass variance (E[x^2] - E[x]^2 loses digits)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head attention: out(softmax(q k^T / sqrt(d)) v) with q from x, k and v from context.

  Submodules `query`, `key`, `value`, `out` (diffusers' to_q/to_k/to_v/to_out.0; transformers'
  q_proj/k_proj/v_proj/out_proj).
  """
  num_heads: int
  qkv_bias: bool = False  # diffusers' U-Net attention: False; CLIP: True
  zero_init: bool = False  # zero-init `out` so a residual attention layer starts as identity
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, *,
               mask: jnp.ndarray | None = None, is_causal: bool = False) -> jnp.ndarray:
    """Attends from x to context (to x itself when context is None).

    Args:
      x: [B, T, D] queries.
      context: [B, S, D_context] keys and values, or None for self-attention.
      mask: [B, S] bool, False for keys to ignore (padding), or None.
      is_causal: position i attends only to positions <= i (self-attention only).

    Returns:
      [B, T, D].
    """
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the attention width {width}")
    context = x if context is None else context
    head_dim = width // self.num_heads

    def heads(name, inputs):
      h = _dense(width, self.dtype, self.param_dtype, name, use_bias=self.qkv_bias)(inputs)
      return h.reshape(batch, inputs.shape[1], self.num_heads, head_dim)

    q, k, v = heads("query", x), heads("key", context), heads("value", context)
    a = attention(q, k, v, mask=mask, is_causal=is_causal)
    a = a.reshape(batch, length, width)
    return _dense(width, self.dtype, self.param_dtype, "out", zero=self.zero_init)(a)


class BasicTransformerBlock(nn.Module):
  """diffusers' BasicTransformerBlock with LayerNorms and a GEGLU feed-forward.

  h = x + self_attn(norm_1(x)); h = h + cross_attn(norm_2(h), context);
  out = h + dense_out(a * gelu(g)) with [a, g] = geglu_proj(norm_3(h)) (Shazeer 2020).
  """
  num_heads: int
  norm_eps: float = 1e-5
  ff_mult: int = 4  # feed-forward inner width = ff_mult * width
  zero_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, D], context: [B, S, D_context] -> [B, T, D]."""
    width = x.shape[-1]
    norm = lambda name: layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)
    attention = lambda name: Attention(self.num_heads, zero_init=self.zero_init, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    x = x + attention("self_attn")(norm("norm_1")(x))
    x = x + attention("cross_attn")(norm("norm_2")(x), context.astype(self.dtype))
    inner = self.ff_mult * width
    h = _dense(2 * inner, self.dtype, self.param_dtype, "geglu_proj")(norm("norm_3")(x))
    value, gate = jnp.split(h, 2, axis=-1)
    h = value * nn.gelu(gate, approximate=False)
    return x + _dense(width, self.dtype, self.param_dtype, "dense_out", zero=self.zero_init)(h)


class SpatialTransformer(nn.Module):
  """diffusers' Transformer2DModel on an image: x + proj_out(blocks(proj_in(norm(x)))).

  The GroupNorm uses eps 1e-6 (fixed in diffusers), the blocks' LayerNorms 1e-5.
  """
  num_heads: int
  num_layers: int = 1
  norm_groups: int = 32
  zero_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    """x: [B, H, W, C], context: [B, S, D_context] -> [B, H, W, C]."""
    batch, height, width, channels = x.shape
    h = group_norm(self.norm_groups, 1e-6, self.dtype, self.param_dtype, "norm")(x)
    h = h.reshape(batch, height * width, channels)
    h = _dense(channels, self.dtype, self.param_dtype, "proj_in")(h)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.num_heads, zero_init=self.zero_init, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"block_{i}")(h, context)
    h = _dense(channels, self.dtype, self.param_dtype, "proj_out", zero=self.zero_init)(h)
    return x + h.reshape(x.shape)
