"""The DDPM / ADM U-Net (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021), NHWC, Flax linen.

Layout, for L = len(channel_mult) levels with widths w_l = channels * channel_mult[l]:

  conv_in -> down path: per level `num_res_blocks` x (ResBlock [+ SelfAttention]), then a strided
  conv (all but the last level) -> mid: ResBlock, [SelfAttention], ResBlock -> up path: per level
  (coarsest first) `num_res_blocks + 1` x (concat skip, ResBlock [+ SelfAttention]), then a
  nearest x2 upsample + conv (all but level 0) -> GroupNorm, SiLU, conv_out (float32).

Every activation pushed on the down path (conv_in output, each block output, each downsample
output) is popped once on the up path, as in DDPM, ADM and diffusers' `UNet2DModel`; the
submodule names (`down_{level}_res_{i}`, `up_{level}_attn_{i}`, ...) index levels by resolution
(level 0 = full size) on both paths, so `jaxdiff.convert.unet` can map diffusers weights onto them.

Initialisation: kernels use DDPM's variance_scaling(1, fan_avg, uniform). With `zero_init`
(default, as in both DDPM's `init_scale=0.` and ADM's `zero_module`), the second conv of every
ResBlock, the attention output projection and conv_out start at zero: every residual block and
attention layer starts as the identity and the network's output starts at exactly zero.
(DDPM's TF code writes init_scale=0., which its initialiser turns into a 1e-10 variance scale.)
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import Dense
from jaxdiff.models.layers import KERNEL_INIT
from jaxdiff.models.layers import attention
from jaxdiff.models.layers import conv
from jaxdiff.models.layers import group_norm
from jaxdiff.models.layers import kernel_init
from jaxdiff.models.layers import timestep_embedding


class ResBlock(nn.Module):
  """Residual block conditioned on the time (+ class) embedding.

  h = conv_1(silu(norm_1(x))); then either norm_2(h + proj(silu(emb))) (DDPM) or, with
  `scale_shift`, norm_2(h) * (1 + scale) + shift with [scale, shift] = proj(silu(emb)) (ADM);
  out = skip(x) + conv_2(dropout(silu(.))), skip a 1x1 conv when the width changes.
  """
  features: int
  dropout: float = 0.0
  scale_shift: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-6
  zero_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool) -> jnp.ndarray:
    """x: [B, H, W, C_in], emb: [B, E] -> [B, H, W, features]."""
    norm_args = (self.norm_groups, self.norm_eps, self.dtype, self.param_dtype)
    h = nn.silu(group_norm(*norm_args, name="norm_1")(x))
    h = conv(self.features, 3, self.dtype, self.param_dtype, "conv_1")(h)
    emb_out = nn.Dense(self.features * (2 if self.scale_shift else 1), dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=KERNEL_INIT,
                       name="time_proj")(nn.silu(emb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm(*norm_args, name="norm_2")(h) * (1 + scale) + shift
    else:
      h = group_norm(*norm_args, name="norm_2")(h + emb_out)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.features, 3, self.dtype, self.param_dtype, "conv_2", zero=self.zero_init)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, self.dtype, self.param_dtype, "skip_proj")(x)
    return x + h


class SelfAttention(nn.Module):
  """Residual multi-head self-attention over the H*W positions: x + out(attn(norm(x)))."""
  head_dim: int = 0  # channels per head; 0 = one head over all channels (DDPM)
  use_norm: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-6
  zero_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    height, channels = x.shape[1], x.shape[3]
    heads = channels // self.head_dim if self.head_dim else 1
    h = x
    if self.use_norm:
      h = group_norm(self.norm_groups, self.norm_eps, self.dtype, self.param_dtype, "norm")(h)
    h = einops.rearrange(h, "b h w c -> b (h w) c")

    def dense(name, zero=False):
      return Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=kernel_init(zero), name=name)

    q, k, v = (einops.rearrange(dense(name)(h), "b l (heads d) -> b l heads d", heads=heads)
               for name in ("query", "key", "value"))
    # Logits and softmax run in float32 even for bfloat16 inputs (jax.nn's XLA path).
    a = einops.rearrange(attention(q, k, v), "b l heads d -> b l (heads d)")
    out = dense("out", zero=self.zero_init)(a)
    return x + einops.rearrange(out, "b (h w) c -> b h w c", h=height)


class UNet(nn.Module):
  """DDPM / ADM U-Net denoiser. Defaults are DDPM's conventions; sizes live in `UNET_SIZES`.

  Fields are documented inline (allowed values in the comments); see the module docstring for
  the layout and the initialisation. `jaxdiff.convert.unet.unet_fields` maps diffusers'
  UNet2DModel configs onto these fields.
  """
  channels: int = 128  # width of level 0 (conv_in); level l has channels * channel_mult[l]
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2  # per level on the down path (the up path has one more)
  attention_levels: tuple[int, ...] = (1,)  # levels (0 = full resolution) with self-attention
  attention_head_dim: int = 0  # channels per head; 0 = one head over all channels (DDPM)
  mid_attention: bool = True  # self-attention between the two mid ResBlocks
  # GroupNorm before the mid attention; diffusers' UNet2DModel drops it with scale-shift norm.
  mid_attention_norm: bool = True
  dropout: float = 0.1  # in ResBlocks, rng stream "dropout", only with train=True
  scale_shift_norm: bool = False  # ADM's norm(h) * (1 + scale) + shift instead of norm(h + emb)
  norm_groups: int = 32  # must divide every width
  norm_eps: float = 1e-6  # DDPM (TF) uses 1e-6, ADM (PyTorch default) 1e-5
  time_embed_dim: int = 0  # width of the time MLP; 0 = 4 * channels
  flip_sin_to_cos: bool = False  # False = [sin, cos] (DDPM), True = [cos, sin] (ADM, diffusers)
  freq_shift: float = 1.0  # 1 = DDPM's log(10000) / (half - 1); 0 = ADM's / half
  downsample_padding: str = "same"  # "same": pad bottom/right only (DDPM, TF); "symmetric": pad 1
  zero_init: bool = True  # zero-init conv_2 of ResBlocks, attention `out`, conv_out
  out_channels: int = 0  # 0 = the input's channel count; doubled with learn_sigma
  num_classes: int = 0  # 0 = unconditional
  class_dropout_prob: float = 0.0  # > 0 adds the null row `num_classes` and drops labels in train
  learn_sigma: bool = False  # output [eps, variance interpolation] (ADM): 2 * out channels
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None, *,
               train: bool = False) -> jnp.ndarray:
    """Predicts the noise (or x0 / v) of a noisy batch.

    Args:
      x: [B, H, W, C] noisy images; H and W divisible by 2 ** (len(channel_mult) - 1).
      t: [B] timesteps, int or float (embedded in float32).
      y: [B] int class labels in [0, num_classes), or None (= the null label on a conditional
        model; not allowed on a model without a null row).
      train: enables dropout and label dropout (both use the "dropout" rng).

    Returns:
      [B, H, W, out] float32, out = (out_channels or C) * (2 if learn_sigma else 1).
    """
    self._check_input(x)
    emb = self._embed(t, y, train)
    h = conv(self.channels, 3, self.dtype, self.param_dtype, "conv_in")(x)
    h, skips = self._down(h, emb, train)
    h = self._res_block(self.channels * self.channel_mult[-1], "mid_res_0")(h, emb, train)
    if self.mid_attention:
      h = self._attention("mid_attn", use_norm=self.mid_attention_norm)(h)
    h = self._res_block(self.channels * self.channel_mult[-1], "mid_res_1")(h, emb, train)
    h = self._up(h, skips, emb, train)
    h = nn.silu(group_norm(self.norm_groups, self.norm_eps, jnp.float32, self.param_dtype,
                            "norm_out")(h.astype(jnp.float32)))
    out = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)
    return conv(out, 3, jnp.float32, self.param_dtype, "conv_out", zero=self.zero_init)(h)

  def _check_input(self, x: jnp.ndarray) -> None:
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"UNet input must be [B, H, W, C] with H and W divisible by 2**(levels-1) = {factor} "
          f"(channel_mult={self.channel_mult}); got shape {x.shape}")
    widths = [self.channels * m for m in self.channel_mult]
    if any(w % self.norm_groups for w in widths):
      raise ValueError(f"norm_groups={self.norm_groups} must divide every width {widths}")
    attended = [w for l, w in enumerate(widths) if l in self.attention_levels]
    attended += [widths[-1]] if self.mid_attention else []
    if self.attention_head_dim and any(w % self.attention_head_dim for w in attended):
      raise ValueError(f"attention_head_dim={self.attention_head_dim} must divide the width of "
                       f"every attention layer {attended}")
    bad_levels = [l for l in self.attention_levels if not 0 <= l < len(self.channel_mult)]
    if bad_levels:
      raise ValueError(f"attention_levels {bad_levels} out of range for {len(widths)} levels")
    if self.num_classes < 0 or not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"num_classes={self.num_classes} must be >= 0 and class_dropout_prob="
                       f"{self.class_dropout_prob} in [0, 1]")
    if self.downsample_padding not in ("same", "symmetric"):
      raise ValueError(
          f"downsample_padding={self.downsample_padding!r}; choose 'same' or 'symmetric'")

  def _embed(self, t: jnp.ndarray, y: jnp.ndarray | None, train: bool) -> jnp.ndarray:
    """Time MLP (+ class embedding): t [B], y [B] or None -> [B, time_embed_dim]."""
    dim = self.time_embed_dim or 4 * self.channels
    emb = timestep_embedding(t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos,
                             freq_shift=self.freq_shift)
    dense = lambda name: nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=KERNEL_INIT, name=name)
    emb = dense("time_dense_2")(nn.silu(dense("time_dense_1")(emb)))
    if self.num_classes == 0:
      if y is not None:
        raise ValueError("labels y were given to an unconditional UNet (num_classes=0)")
      return emb
    has_null = self.class_dropout_prob > 0
    if y is None:
      if not has_null:
        raise ValueError(
            "y=None means the null label, but this UNet has no null row "
            "(num_classes > 0 with class_dropout_prob=0); pass labels")
      y = jnp.full(t.shape, self.num_classes, jnp.int32)
    elif train and has_null:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout_prob, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    table = nn.Embed(self.num_classes + int(has_null), dim, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="class_embed")
    return emb + table(y)

  def _down(self, h, emb, train):
    """Down path: h [B, H, W, channels] -> (coarsest h, list of skip activations)."""
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = self._res_block(self.channels * mult, f"down_{level}_res_{i}")(h, emb, train)
        if level in self.attention_levels:
          h = self._attention(f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level != last:
        pad = ((0, 1), (0, 1)) if self.downsample_padding == "same" else ((1, 1), (1, 1))
        h = conv(h.shape[-1], 3, self.dtype, self.param_dtype, f"down_{level}_downsample",
                  stride=2, padding=pad)(h)
        skips.append(h)
    return h, skips

  def _up(self, h, skips, emb, train):
    """Up path: consumes `skips` (last first) -> h [B, H, W, channels * channel_mult[0]]."""
    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._res_block(self.channels * self.channel_mult[level],
                            f"up_{level}_res_{i}")(h, emb, train)
        if level in self.attention_levels:
          h = self._attention(f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = conv(h.shape[-1], 3, self.dtype, self.param_dtype, f"up_{level}_upsample")(h)
    return h

  def _res_block(self, features: int, name: str) -> ResBlock:
    return ResBlock(features, dropout=self.dropout, scale_shift=self.scale_shift_norm,
                    norm_groups=self.norm_groups, norm_eps=self.norm_eps,
                    zero_init=self.zero_init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=name)

  def _attention(self, name: str, use_norm: bool = True) -> SelfAttention:
    return SelfAttention(head_dim=self.attention_head_dim, use_norm=use_norm,
                         norm_groups=self.norm_groups, norm_eps=self.norm_eps,
                         zero_init=self.zero_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)


# name -> UNet field values. Every DDPM convention is spelled out so the presets do not move
# if the module defaults change.
_DDPM_CONVENTIONS = dict(flip_sin_to_cos=False, freq_shift=1.0, downsample_padding="same",
                         norm_eps=1e-6, scale_shift_norm=False, attention_head_dim=0)

UNET_SIZES = {
    # Ho et al. 2020, CIFAR-10 32x32: 35.7M parameters, attention at 16x16 (level 1).
    "unet-ddpm-cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                              attention_levels=(1,), dropout=0.1, norm_groups=32,
                              **_DDPM_CONVENTIONS),
    # A few million parameters: trains on a laptop at 32x32.
    "unet-small": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                       attention_levels=(1,), dropout=0.1, norm_groups=32, **_DDPM_CONVENTIONS),
    # For tests: two levels of widths 32 and 64, one block each.
    "unet-tiny": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                      dropout=0.0, norm_groups=8, **_DDPM_CONVENTIONS),
}
