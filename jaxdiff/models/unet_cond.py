"""The text-conditioned latent U-Net of Stable Diffusion (Rombach et al. 2022), NHWC, Flax linen.

The layout of diffusers' `UNet2DConditionModel`, for L = len(widths) levels:

  conv_in -> down path: per level `layers_per_block` x (ResBlock [+ SpatialTransformer]) then a
  strided conv (all but the last level) -> mid: ResBlock, SpatialTransformer, ResBlock -> up
  path: per level (coarsest first) `layers_per_block + 1` x (concat skip, ResBlock
  [+ SpatialTransformer]) then a nearest x2 upsample + conv (all but level 0) -> GroupNorm,
  SiLU, conv_out (float32).

Levels listed in `cross_attention_levels` hold SpatialTransformers (diffusers' CrossAttnDownBlock2D
and CrossAttnUpBlock2D; the others are DownBlock2D / UpBlock2D), which cross-attend from the
image to the text context [B, S, D_context]. `num_heads[l]` heads at level l: SD 1.x has 8 heads
everywhere (diffusers spells this `attention_head_dim=8`), SD 2.x (5, 10, 20, 20), i.e. 64
channels per head. The mid transformer uses the last level's head count.

The ResBlock, skip bookkeeping and submodule names (`down_{level}_res_{i}`, `up_{level}_attn_{i}`,
levels indexed by resolution on both paths) are those of `jaxdiff.models.unet`; diffusers'
ResnetBlock2D with the default time shift is that ResBlock. `jaxdiff.convert.unet_cond` maps
diffusers weights onto these names.

Precision: convolutions, norms and attention run in `dtype`; the timestep embedding and the
output GroupNorm + conv run in float32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.transformer import SpatialTransformer
from jaxdiff.models.layers import conv, group_norm
from jaxdiff.models.unet import ResBlock


class UNetCond(nn.Module):
  """Stable Diffusion's U-Net: x [B, H, W, C], t [B], context [B, S, D] -> [B, H, W, out] float32.

  Defaults are SD 1.x's; `UNET_COND_SIZES` holds the named layouts. Initialisation follows
  `jaxdiff.models.unet`: with `zero_init` every residual branch and conv_out start at zero.
  """
  widths: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level (block_out_channels)
  layers_per_block: int = 2  # ResBlocks per level on the down path (the up path has one more)
  cross_attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with SpatialTransformers
  num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level; the mid block: last
  transformer_layers: int = 1  # BasicTransformerBlocks per SpatialTransformer
  dropout: float = 0.0  # in ResBlocks, rng stream "dropout", only with train=True
  norm_groups: int = 32  # must divide every width
  norm_eps: float = 1e-5  # ResBlocks and the output GroupNorm
  time_embed_dim: int = 0  # width of the time MLP; 0 = 4 * widths[0]
  flip_sin_to_cos: bool = True  # [cos, sin] (diffusers' default) or [sin, cos]
  freq_shift: float = 0.0  # exponent divisor half - freq_shift (SD: 0; see layers.py)
  downsample_padding: str = "symmetric"  # "symmetric": pad 1 (SD); "same": bottom/right only
  zero_init: bool = True  # zero-init ResBlock conv_2, attention/feed-forward outputs, conv_out
  out_channels: int = 0  # 0 = the input's channel count
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray, *,
               train: bool = False) -> jnp.ndarray:
    """Predicts the noise (or v) of a batch of noisy latents given text embeddings.

    Args:
      x: [B, H, W, C] noisy latents; H and W divisible by 2 ** (len(widths) - 1).
      t: [B] timesteps, int or float (embedded in float32).
      context: [B, S, D_context] text encoder hidden states (the U-Net's cross-attention input).
      train: enables dropout (rng stream "dropout").

    Returns:
      [B, H, W, out_channels or C] float32.
    """
    self._check_input(x, context)
    emb = self._embed(t)
    h = conv(self.widths[0], 3, self.dtype, self.param_dtype, "conv_in")(x)
    h, skips = self._down(h, emb, context, train)
    h = self._res_block(self.widths[-1], "mid_res_0")(h, emb, train)
    h = self._transformer(len(self.widths) - 1, "mid_attn")(h, context)
    h = self._res_block(self.widths[-1], "mid_res_1")(h, emb, train)
    h = self._up(h, skips, emb, context, train)
    h = nn.silu(group_norm(self.norm_groups, self.norm_eps, jnp.float32, self.param_dtype,
                            "norm_out")(h.astype(jnp.float32)))
    return conv(self.out_channels or x.shape[-1], 3, jnp.float32, self.param_dtype, "conv_out",
                 zero=self.zero_init)(h)

  def _check_input(self, x: jnp.ndarray, context: jnp.ndarray) -> None:
    factor = 2 ** (len(self.widths) - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"UNetCond input must be [B, H, W, C] with H and W divisible by 2**(levels-1) = "
          f"{factor} (widths={self.widths}); got shape {x.shape}")
    if context.ndim != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(f"UNetCond context must be [B, S, D] with B = {x.shape[0]}; "
                       f"got shape {context.shape}")
    if len(self.num_heads) != len(self.widths):
      raise ValueError(f"num_heads={self.num_heads} needs one entry per level of "
                       f"widths={self.widths}")
    if any(w % self.norm_groups for w in self.widths):
      raise ValueError(f"norm_groups={self.norm_groups} must divide every width {self.widths}")
    bad = [l for l in self.cross_attention_levels if not 0 <= l < len(self.widths)]
    if bad:
      raise ValueError(f"cross_attention_levels {bad} out of range for {len(self.widths)} levels")
    if self.downsample_padding not in ("same", "symmetric"):
      raise ValueError(
          f"downsample_padding={self.downsample_padding!r}; choose 'same' or 'symmetric'")

  def _embed(self, t: jnp.ndarray) -> jnp.ndarray:
    """Time MLP: t [B] -> [B, time_embed_dim] (diffusers' Timesteps + TimestepEmbedding)."""
    dim = self.time_embed_dim or 4 * self.widths[0]
    emb = timestep_embedding(t, self.widths[0], flip_sin_to_cos=self.flip_sin_to_cos,
                             freq_shift=self.freq_shift)
    dense = lambda name: nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    return dense("time_dense_2")(nn.silu(dense("time_dense_1")(emb)))

  def _down(self, h, emb, context, train):
    """Down path: h [B, H, W, widths[0]] -> (coarsest h, list of skip activations)."""
    skips = [h]
    last = len(self.widths) - 1
    for level, width in enumerate(self.widths):
      for i in range(self.layers_per_block):
        h = self._res_block(width, f"down_{level}_res_{i}")(h, emb, train)
        if level in self.cross_attention_levels:
          h = self._transformer(level, f"down_{level}_attn_{i}")(h, context)
        skips.append(h)
      if level != last:
        pad = ((0, 1), (0, 1)) if self.downsample_padding == "same" else ((1, 1), (1, 1))
        h = conv(width, 3, self.dtype, self.param_dtype, f"down_{level}_downsample",
                  stride=2, padding=pad)(h)
        skips.append(h)
    return h, skips

  def _up(self, h, skips, emb, context, train):
    """Up path: consumes `skips` (last first) -> h [B, H, W, widths[0]]."""
    for level in reversed(range(len(self.widths))):
      for i in range(self.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._res_block(self.widths[level], f"up_{level}_res_{i}")(h, emb, train)
        if level in self.cross_attention_levels:
          h = self._transformer(level, f"up_{level}_attn_{i}")(h, context)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = conv(h.shape[-1], 3, self.dtype, self.param_dtype, f"up_{level}_upsample")(h)
    return h

  def _res_block(self, features: int, name: str) -> ResBlock:
    return ResBlock(features, dropout=self.dropout, norm_groups=self.norm_groups,
                    norm_eps=self.norm_eps, zero_init=self.zero_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  def _transformer(self, level: int, name: str) -> SpatialTransformer:
    return SpatialTransformer(self.num_heads[level], num_layers=self.transformer_layers,
                              norm_groups=self.norm_groups, zero_init=self.zero_init,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)


_SD_COMMON = dict(widths=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_levels=(0, 1, 2), norm_groups=32, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0.0, downsample_padding="symmetric")

# name -> UNetCond field values.
UNET_COND_SIZES = {
    # runwayml/stable-diffusion-v1-5: 859.5M parameters, 8 heads per level, context 768 (CLIP L).
    "unet-sd1": dict(_SD_COMMON, num_heads=(8, 8, 8, 8)),
    # stabilityai/stable-diffusion-2-1: 865.9M parameters, 64-channel heads, context 1024.
    "unet-sd2": dict(_SD_COMMON, num_heads=(5, 10, 20, 20)),
    # For tests: two levels of widths 32 and 64, cross-attention at level 0 and in the middle.
    "unet-cond-tiny": dict(widths=(32, 64), layers_per_block=1, cross_attention_levels=(0,),
                           num_heads=(2, 4), norm_groups=8),
}
