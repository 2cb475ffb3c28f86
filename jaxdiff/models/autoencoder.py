"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, appendix G), NHWC, Flax.

The layout is LDM's `AutoencoderKL`, as diffusers ships it (the Stable Diffusion / DiT VAE):

  encoder: conv_in -> per level `layers_per_block` x ResnetBlock, then a stride-2 conv padded
    bottom/right (all but the last level) -> mid: ResnetBlock, SelfAttention, ResnetBlock ->
    GroupNorm, SiLU, conv_out to 2 * latent_channels -> quant_conv (1x1, optional)
    = [mean, logvar] of a diagonal Gaussian posterior q(z | x), logvar clipped to [-30, 20].
  decoder: post_quant_conv (1x1, optional) -> conv_in -> mid -> per level (coarsest first)
    `layers_per_block + 1` x ResnetBlock, then a nearest x2 upsample + conv (all but level 0)
    -> GroupNorm, SiLU, conv_out.

Submodules are named by resolution level (`down_{level}_res_{i}`, `up_{level}_upsample`, level
0 = full size), as in the U-Net, so `jaxdiff.convert.autoencoder` maps diffusers weights onto
them. ResNet blocks have no time embedding; the mid attention is single-head over all channels
(the U-Net's `SelfAttention`).

Latent scale: a diffusion model sees `(z - shift_factor) * scaling_factor` (`scale_latents`),
the decoder gets `z_model / scaling_factor + shift_factor` (`unscale_latents`). SD / DiT use
scaling 0.18215 and no shift; SD3 / Flux configs carry a shift.

Precision: convolutions, GroupNorm affine and attention run in `dtype`; GroupNorm statistics
and attention softmax in float32; the encoder's last conv and quant_conv and the decoder's last
GroupNorm and conv run in float32, so `encode` and `decode` return float32 in any `dtype`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import KERNEL_INIT
from jaxdiff.models.layers import conv
from jaxdiff.models.layers import group_norm
from jaxdiff.models.unet import SelfAttention

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's and diffusers' DiagonalGaussianDistribution clip


class ResnetBlock(nn.Module):
  """h = conv_2(silu(norm_2(conv_1(silu(norm_1(x)))))); out = skip(x) + h, skip a 1x1 conv when
  the width changes (LDM's ResnetBlock without a time embedding)."""
  features: int
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, H, W, C_in] -> [B, H, W, features]."""
    norm_args = (self.norm_groups, self.norm_eps, self.dtype, self.param_dtype)
    h = nn.silu(group_norm(*norm_args, name="norm_1")(x))
    h = conv(self.features, 3, self.dtype, self.param_dtype, "conv_1")(h)
    h = nn.silu(group_norm(*norm_args, name="norm_2")(h))
    h = conv(self.features, 3, self.dtype, self.param_dtype, "conv_2")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, self.dtype, self.param_dtype, "skip_proj")(x)
    return x.astype(h.dtype) + h


class _Tower(nn.Module):
  """Fields and blocks shared by the encoder and the decoder."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_features: int
  norm_groups: int
  mid_attention: bool
  dtype: Any
  param_dtype: Any
  norm_eps: float = 1e-6

  def _res(self, features: int, name: str) -> ResnetBlock:
    return ResnetBlock(features, self.norm_groups, self.norm_eps, self.dtype, self.param_dtype,
                       name=name)

  def _mid(self, h: jnp.ndarray) -> jnp.ndarray:
    width = self.block_out_channels[-1]
    h = self._res(width, "mid_res_0")(h)
    if self.mid_attention:
      h = SelfAttention(head_dim=0, norm_groups=self.norm_groups, norm_eps=self.norm_eps,
                        zero_init=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="mid_attn")(h)
    return self._res(width, "mid_res_1")(h)

  def _out(self, h: jnp.ndarray) -> jnp.ndarray:
    h = group_norm(self.norm_groups, self.norm_eps, jnp.float32, self.param_dtype,
                   "norm_out")(h.astype(jnp.float32))
    return conv(self.out_features, 3, jnp.float32, self.param_dtype, "conv_out")(nn.silu(h))


class Encoder(_Tower):
  """Image [B, H, W, C] -> [B, H / f, W / f, out_features], f = 2 ** (levels - 1)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = conv(self.block_out_channels[0], 3, self.dtype, self.param_dtype, "conv_in")(x)
    last = len(self.block_out_channels) - 1
    for level, width in enumerate(self.block_out_channels):
      for i in range(self.layers_per_block):
        h = self._res(width, f"down_{level}_res_{i}")(h)
      if level != last:
        h = conv(width, 3, self.dtype, self.param_dtype, f"down_{level}_downsample", stride=2,
                 padding=((0, 1), (0, 1)))(h)
    return self._out(self._mid(h))


class Decoder(_Tower):
  """Latent [B, h, w, latent_channels] -> image [B, h * f, w * f, out_features], float32."""

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    h = conv(self.block_out_channels[-1], 3, self.dtype, self.param_dtype, "conv_in")(z)
    h = self._mid(h)
    for level in reversed(range(len(self.block_out_channels))):
      for i in range(self.layers_per_block + 1):
        h = self._res(self.block_out_channels[level], f"up_{level}_res_{i}")(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = conv(h.shape[-1], 3, self.dtype, self.param_dtype, f"up_{level}_upsample")(h)
    return self._out(h)


class AutoencoderKL(nn.Module):
  """KL autoencoder: `encode(x) -> (mean, logvar)`, `decode(z) -> x`, both float32.

  Call a method with `model.apply({"params": p}, x, method=model.encode)`. `__call__` runs
  both (for `init` and reconstruction training). Sizes live in `AUTOENCODER_SIZES`;
  `jaxdiff.convert.autoencoder` maps diffusers `AutoencoderKL` configs onto these fields.
  """
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level (0 = full size)
  layers_per_block: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
  latent_channels: int = 4
  out_channels: int = 3  # image channels the decoder produces
  norm_groups: int = 32  # must divide every width
  mid_attention: bool = True  # self-attention between the two mid ResnetBlocks
  use_quant_conv: bool = True  # 1x1 conv on [mean, logvar] after the encoder
  use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
  scaling_factor: float = 0.18215  # z_model = (z - shift_factor) * scaling_factor
  shift_factor: float = 0.0
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    widths = list(self.block_out_channels)
    if not widths or any(w % self.norm_groups for w in widths):
      raise ValueError(f"AutoencoderKL norm_groups={self.norm_groups} must divide every width "
                       f"of block_out_channels={self.block_out_channels}")
    tower = dict(block_out_channels=tuple(widths), layers_per_block=self.layers_per_block,
                 norm_groups=self.norm_groups, mid_attention=self.mid_attention,
                 dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(out_features=2 * self.latent_channels, **tower)
    self.decoder = Decoder(out_features=self.out_channels, **tower)
    # Named by their attribute (setup modules take no `name=`).
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=jnp.float32,
                                param_dtype=self.param_dtype, kernel_init=KERNEL_INIT)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype,
                                     param_dtype=self.param_dtype, kernel_init=KERNEL_INIT)

  def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Posterior q(z | x) = N(mean, exp(logvar)).

    Args:
      x: [B, H, W, C] images in [-1, 1]; H and W divisible by `downsample_factor`.

    Returns:
      (mean, logvar), each float32 [B, H / f, W / f, latent_channels]; logvar clipped to
      [-30, 20].
    """
    factor = self.downsample_factor
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"AutoencoderKL input must be [B, H, W, C] with H and W divisible by "
                       f"{factor}; got shape {x.shape}")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """z: [B, h, w, latent_channels] unscaled latents -> float32 [B, h * f, w * f, out]."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode expects latents [B, h, w, {self.latent_channels}]"
                       f", got shape {z.shape}")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jnp.ndarray, key: jax.Array | None = None):
    """Reconstruction: x [B, H, W, C] -> (x_hat float32, mean, logvar).

    z is the posterior mean, or a draw mean + exp(logvar / 2) * eps when `key` is given.
    """
    mean, logvar = self.encode(x)
    z = mean if key is None else sample_posterior(key, mean, logvar)
    return self.decode(z), mean, logvar


def sample_posterior(key: jax.Array, mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); float32, shape of `mean`."""
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: [B].

  0.5 * sum(mean^2 + exp(logvar) - 1 - logvar), LDM's `DiagonalGaussianDistribution.kl`.
  """
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def autoencoder_loss(apply_fn, params, x: jnp.ndarray, keys: jax.Array, *,
                     loss_type: str = "l1", kl_weight: float = 1e-6
                     ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """LDM's autoencoder objective without the perceptual and adversarial terms, per example.

  z_i ~ q(z | x_i) is drawn with example i's own key, x̂_i = decode(z_i), and

    loss_i = mean_pixels(|x_i - x̂_i|  or  (x_i - x̂_i)^2) + kl_weight * KL_i / (H W C),

  KL_i = KL(q(z | x_i) || N(0, I)) summed over the latent (`kl_divergence`). This is LDM's
  `LPIPSWithDiscriminator` loss at logvar = 0 with no LPIPS or GAN term (sum of the pixel error
  plus kl_weight * KL), divided by the image's H W C elements: the same optimum and LDM's
  meaning of kl_weight, on the scale of a per-pixel loss.

  Args:
    apply_fn: the `AutoencoderKL`'s `apply`.
    params: its parameters.
    x: [B, H, W, C] images in [-1, 1].
    keys: [B] keys, one per example (the posterior draw).
    loss_type: "l1" (LDM) or "l2".
    kl_weight: weight of the KL term (LDM's kl-f8: 1e-6).

  Returns:
    (loss [B], {"reconstruction": [B] the pixel term, "kl": [B] KL_i}).
  """
  if loss_type not in ("l1", "l2"):
    raise ValueError(f"loss_type={loss_type!r} must be 'l1' or 'l2'")

  def reconstruct(module, images, example_keys):
    mean, logvar = module.encode(images)
    return module.decode(jax.vmap(sample_posterior)(example_keys, mean, logvar)), mean, logvar

  x_hat, mean, logvar = apply_fn({"params": params}, x, keys, method=reconstruct)
  error = x_hat - x.astype(jnp.float32)
  error = jnp.abs(error) if loss_type == "l1" else jnp.square(error)
  reconstruction = jnp.mean(error.reshape(error.shape[0], -1), axis=-1)
  kl = kl_divergence(mean, logvar)
  loss = reconstruction + kl_weight * kl / np.prod(x.shape[1:])
  return loss, {"reconstruction": reconstruction, "kl": kl}


def scale_latents(model: AutoencoderKL, z: jnp.ndarray) -> jnp.ndarray:
  """Autoencoder latents -> the diffusion model's scale: (z - shift) * scaling."""
  return (z - model.shift_factor) * model.scaling_factor


def unscale_latents(model: AutoencoderKL, z_model: jnp.ndarray) -> jnp.ndarray:
  """The diffusion model's latents -> the decoder's scale: z / scaling + shift."""
  return z_model / model.scaling_factor + model.shift_factor


@functools.partial(jax.jit, static_argnums=0)
def _decode_chunk(model: AutoencoderKL, params, z):
  return model.apply({"params": params}, z, method=model.decode)


def decode_in_chunks(model: AutoencoderKL, params, z: np.ndarray | jax.Array,
                     chunk_size: int = 32) -> np.ndarray:
  """Decodes a large batch `chunk_size` latents at a time, so memory does not grow with B.

  Every chunk has the same shape (the last one is zero-padded), so the decoder compiles once
  per (model, chunk shape). Results are gathered on the host.

  Args:
    model: the autoencoder (hashable; its dtype sets the compute precision).
    params: its parameters.
    z: [B, h, w, latent_channels] unscaled latents (see `unscale_latents`).
    chunk_size: latents per decoder call.

  Returns:
    float32 NumPy [B, h * f, w * f, out_channels].
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  count = len(z)
  if count == 0:
    raise ValueError("decode_in_chunks got an empty batch of latents")
  chunk_size = min(chunk_size, count)
  outputs = []
  for start in range(0, count, chunk_size):
    chunk = jnp.asarray(z[start:start + chunk_size])
    rows = len(chunk)
    if rows < chunk_size:
      chunk = jnp.pad(chunk, ((0, chunk_size - rows),) + ((0, 0),) * (chunk.ndim - 1))
    outputs.append(np.asarray(_decode_chunk(model, params, chunk))[:rows])
  return np.concatenate(outputs)


# name -> AutoencoderKL field values.
AUTOENCODER_SIZES = {
    # LDM's kl-f8 (Stable Diffusion 1.x / 2.x and DiT's sd-vae-ft-ema/mse): 83.7M parameters,
    # 256x256x3 -> 32x32x4.
    "kl-f8": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  latent_channels=4, norm_groups=32, scaling_factor=0.18215),
    # Small enough to train on the offline digits: 32x32x1 -> 8x8x4.
    "kl-f4-small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                        out_channels=1, norm_groups=16, scaling_factor=1.0),
    # For tests: 16x16 -> 8x8.
    "kl-tiny": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                    norm_groups=4, scaling_factor=1.0),
}


def build_autoencoder(name: str, **overrides) -> AutoencoderKL:
  """The autoencoder `name` of `AUTOENCODER_SIZES` with field overrides (e.g. dtype)."""
  if name not in AUTOENCODER_SIZES:
    raise ValueError(f"autoencoder name={name!r} is unknown; choose one of "
                     f"{sorted(AUTOENCODER_SIZES)}")
  allowed = set(AutoencoderKL.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"AutoencoderKL has no field(s) {unknown}; allowed: {sorted(allowed)}")
  return AutoencoderKL(**{**AUTOENCODER_SIZES[name], **overrides})
