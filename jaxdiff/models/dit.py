"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Images are patchified into tokens, given fixed 2D sin-cos positions, and processed by `depth`
transformer blocks conditioned on the timestep and class label, then decoded per token back to
an image (noise prediction, plus the variance channels with `learn_sigma`). The four block
designs of the paper (section 3.2) are selected by `DiT.conditioning`:

- `adaln_zero`: scale/shift/gate of each LayerNorm regressed from c = t_emb + y_emb, with the
  regression and the output layer zero-initialised so every block starts as the identity.
- `adaln`: the same without gates, standard initialisation.
- `cross_attn`: a cross-attention layer over the length-2 sequence [t_emb, y_emb] after the
  self-attention.
- `in_context`: t_emb and y_emb appended to the image tokens, removed before the final layer.

Precision: the residual stream, LayerNorms, timestep/label embedders and the final projection
run in float32; attention and MLP matmuls run in `dtype`.
"""

import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import Dense
from jaxdiff.models.layers import attention
from jaxdiff.models.layers import timestep_embedding

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_normal_002 = nn.initializers.normal(stddev=0.02)
# DiT initialises the patch projection as a linear map from the flattened p*p*C patch to D.
_patch_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)

# Table 1 of the paper: (depth, hidden size, heads).
_WIDTHS = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
DIT_SIZES = {
    f"dit-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _WIDTHS.items()
    for patch in (2, 4, 8)
}
DIT_SIZES["dit-tiny"] = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)


@functools.lru_cache(maxsize=32)
def sincos_2d_positions(
    dim: int, grid_h: int, grid_w: int, base_size: int | None = None) -> np.ndarray:
  """Fixed 2D sin-cos position embedding of a grid_h x grid_w token grid (MAE / DiT), in NumPy.

  The first dim/2 channels encode the column, the last dim/2 the row, each as
  [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim/4)), i < dim/4.

  Args:
    dim: embedding width, a multiple of 4.
    grid_h: token rows.
    grid_w: token columns.
    base_size: if given, positions are rescaled to span `base_size` units whatever the grid
      size (diffusers' PatchEmbed `base_size`); identical to integer positions when the grid
      is base_size wide.

  Returns:
    [grid_h * grid_w, dim] float32, tokens in row-major order; read-only (cached).
  """
  rows = np.arange(grid_h, dtype=np.float64)
  cols = np.arange(grid_w, dtype=np.float64)
  if base_size:
    rows, cols = rows / (grid_h / base_size), cols / (grid_w / base_size)
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def one_axis(pos):
    angles = np.outer(pos, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  emb = np.concatenate([one_axis(np.tile(cols, grid_h)), one_axis(np.repeat(rows, grid_w))], 1)
  emb = emb.astype(np.float32)
  emb.flags.writeable = False
  return emb


def _layer_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
  """LayerNorm without affine parameters, in float32 (adaLN supplies scale and shift)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _modulate(x, shift, scale):
  """x: [B, T, D]; shift, scale: [B, D]. Eq. of adaLN: x * (1 + scale) + shift."""
  return x * (1 + scale[:, None]) + shift[:, None]


def _gated(h, gate):
  """h: [B, T, D]; gate: [B, D] (adaLN-Zero's alpha) or None for no gate."""
  return h if gate is None else gate[:, None] * h


class TimestepEmbedder(nn.Module):
  """Sinusoidal frequencies of t followed by a 2-layer SiLU MLP, in float32."""
  hidden_size: int
  frequency_dim: int = 256
  freq_shift: float = 0.0  # 0: original DiT; 1: diffusers' DiT
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    """t: [B] int or float timesteps -> [B, hidden_size] float32."""
    freqs = timestep_embedding(
        t, self.frequency_dim, flip_sin_to_cos=True, freq_shift=self.freq_shift)
    dense = functools.partial(
        nn.Dense, self.hidden_size, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=_normal_002, bias_init=_zeros)
    return dense(name="dense_2")(nn.silu(dense(name="dense_1")(freqs)))


class LabelEmbedder(nn.Module):
  """Class-label embedding table, with a learned null row at index num_classes when
  `dropout_prob > 0` (classifier-free guidance, Ho & Salimans 2022)."""
  num_classes: int
  hidden_size: int
  dropout_prob: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jnp.ndarray | None, batch_size: int, train: bool) -> jnp.ndarray:
    """y: [B] int labels or None (all null) -> [B, hidden_size] float32.

    With `train`, each label is replaced by the null label with probability dropout_prob,
    drawn from the "dropout" rng.
    """
    has_null = self.dropout_prob > 0
    table = self.param(
        "embedding", _normal_002, (self.num_classes + int(has_null), self.hidden_size),
        self.param_dtype)
    if y is None:
      if not has_null:
        raise ValueError(
            "y=None asks for the null label, but this DiT has no null row: set "
            "class_dropout_prob > 0 (or pass labels)")
      y = jnp.full((batch_size,), self.num_classes, jnp.int32)
    y = jnp.asarray(y, jnp.int32)
    if train and has_null:
      drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    return jnp.take(table, y, axis=0).astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head attention: self-attention with a fused `qkv` projection, or cross-attention
  (`query` from x, `key_value` from the context) when a context is given."""
  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: [B, T, D]; context: [B, S, D] or None -> [B, T, D] in dtype."""
    width, heads = self.hidden_size, self.num_heads
    dense = functools.partial(
        Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_xavier,
        bias_init=_zeros)
    if context is None:
      # Layout (q|k|v, head, channel) as in timm/DiT, so fused checkpoints map directly.
      qkv = dense(3 * width, name="qkv")(x)
      # jnp.split, not indexing a stacked axis: its gradient is one concatenate, not three pads.
      q, k, v = (einops.rearrange(part, "b t (heads d) -> b t heads d", heads=heads)
                 for part in jnp.split(qkv, 3, axis=-1))
    else:
      q = dense(width, name="query")(x)
      q = einops.rearrange(q, "b t (heads d) -> b t heads d", heads=heads)
      kv = dense(2 * width, name="key_value")(context)
      k, v = (einops.rearrange(part, "b s (heads d) -> b s heads d", heads=heads)
              for part in jnp.split(kv, 2, axis=-1))
    out = attention(q, k, v)
    return dense(width, name="out")(einops.rearrange(out, "b t heads d -> b t (heads d)"))


class Mlp(nn.Module):
  """Transformer MLP: Dense -> tanh-approximated GELU -> Dense (as DiT)."""
  hidden_size: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, D] -> [B, T, D] in dtype."""
    dense = functools.partial(
        Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_xavier,
        bias_init=_zeros)
    x = dense(int(self.hidden_size * self.mlp_ratio), name="dense_in")(x)
    return dense(self.hidden_size, name="dense_out")(nn.gelu(x, approximate=True))


class DiTBlock(nn.Module):
  """One transformer block; `conditioning` picks the paper's block design (section 3.2)."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  conditioning: str = "adaln_zero"
  mlp_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray | None):
    """Applies the block.

    Args:
      x: [B, T, D] float32 residual stream.
      cond: [B, D] conditioning vector (adaln, adaln_zero), [B, S, D] context tokens
        (cross_attn) or None (in_context).

    Returns:
      ([B, T, D] float32, None): the (carry, output) pair that `nn.scan` expects.
    """
    sub = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.hidden_size, self.num_heads, name="attn", **sub)
    mlp = Mlp(self.hidden_size, self.mlp_ratio, name="mlp", **sub)
    if self.conditioning in ("adaln_zero", "adaln"):
      zero = self.conditioning == "adaln_zero"
      chunks = 6 if zero else 4
      modulation = nn.Dense(
          chunks * self.hidden_size, kernel_init=_zeros if zero else _xavier, bias_init=_zeros,
          name="modulation", **sub)(nn.silu(cond))
      mod = jnp.split(modulation.astype(jnp.float32), chunks, axis=-1)
      if zero:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
      else:
        shift_attn, scale_attn, shift_mlp, scale_mlp = mod
        gate_attn = gate_mlp = None
      h = attn(_modulate(_layer_norm(x, 1e-6), shift_attn, scale_attn))
      x = x + _gated(h, gate_attn)
      h = mlp(_modulate(_layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp))
      return x + _gated(h, gate_mlp), None
    norm = functools.partial(nn.LayerNorm, dtype=jnp.float32, param_dtype=self.param_dtype)
    x = x + attn(norm(epsilon=1e-6, name="norm_attn")(x))
    if self.conditioning == "cross_attn":
      cross = Attention(self.hidden_size, self.num_heads, name="cross_attn", **sub)
      x = x + cross(norm(epsilon=1e-6, name="norm_cross")(x), cond)
    return x + mlp(norm(epsilon=self.mlp_norm_eps, name="norm_mlp")(x)), None


class FinalLayer(nn.Module):
  """(Adaptive) LayerNorm and the per-token linear decoder, in float32."""
  hidden_size: int
  out_features: int
  conditioning: str = "adaln_zero"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray | None) -> jnp.ndarray:
    """x: [B, T, D]; cond: [B, D] for the adaLN variants, else None -> [B, T, out_features]."""
    zero = self.conditioning == "adaln_zero"
    dense = functools.partial(
        Dense, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=_zeros if zero else _xavier, bias_init=_zeros)
    if self.conditioning in ("adaln_zero", "adaln"):
      shift, scale = jnp.split(dense(2 * self.hidden_size, name="modulation")(nn.silu(cond)), 2, -1)
      x = _modulate(_layer_norm(x, 1e-6), shift, scale)
    else:
      x = nn.LayerNorm(1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x)
    return dense(self.out_features, name="dense")(x)


class DiT(nn.Module):
  """Diffusion Transformer on NHWC images or latents.

  Parameters: `patch_embed` (Conv), `time_embed`, `label_embed` (if num_classes > 0),
  `block_0` ... `block_{depth-1}` (or one `blocks` with a leading depth axis when
  `scan_blocks`), `final_layer`. Positions are a NumPy constant, not a parameter.
  """
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 2
  mlp_ratio: float = 4.0
  num_classes: int = 0  # 0: unconditional (labels are ignored)
  class_dropout_prob: float = 0.0  # > 0 adds the null label row at index num_classes
  learn_sigma: bool = False  # output 2C channels: prediction then variance interpolation
  conditioning: str = "adaln_zero"  # adaln_zero | adaln | cross_attn | in_context
  time_freq_shift: float = 0.0  # timestep frequencies: 0 original DiT, 1 diffusers' DiT
  mlp_norm_eps: float = 1e-6  # epsilon of the LayerNorm before the MLP (diffusers: 1e-5)
  pos_embed_base_size: int | None = None  # None: integer token positions; see sincos_2d_positions
  remat: bool = False  # rematerialise each block in the backward pass
  scan_blocks: bool = False  # nn.scan over blocks: params stacked along a leading depth axis
  dtype: Any = jnp.float32  # compute dtype of attention and MLPs
  param_dtype: Any = jnp.float32

  def _check_fields(self):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning={self.conditioning!r}; choose one of {CONDITIONINGS}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos)")

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None, *,
               train: bool = False) -> jnp.ndarray:
    """Predicts noise (and variance) for a batch.

    Args:
      x: [B, H, W, C] noisy images or latents; H and W divisible by patch_size.
      t: [B] timesteps, int or float (a scalar is broadcast).
      y: [B] int labels, or None for the null label (conditional models).
      train: enables label dropout (needs the "dropout" rng when class_dropout_prob > 0).

    Returns:
      [B, H, W, C] float32, or [B, H, W, 2C] with learn_sigma.
    """
    self._check_fields()
    batch, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(
          f"image size {height}x{width} is not divisible by patch_size={p}")
    grid_h, grid_w = height // p, width // p
    tokens = nn.Conv(
        self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=_patch_init, bias_init=_zeros,
        name="patch_embed")(x)
    positions = sincos_2d_positions(self.hidden_size, grid_h, grid_w, self.pos_embed_base_size)
    tokens = einops.rearrange(tokens, "b h w d -> b (h w) d").astype(jnp.float32)
    tokens = tokens + positions

    embeddings = self._embed_conditions(t, y, batch, train)
    adaptive = self.conditioning in ("adaln_zero", "adaln")
    cond = None
    if adaptive:
      cond = sum(embeddings)
    elif self.conditioning == "cross_attn":
      cond = jnp.stack(embeddings, axis=1)
    else:
      tokens = jnp.concatenate([jnp.stack(embeddings, axis=1), tokens], axis=1)
    tokens = self._apply_blocks(tokens, cond)
    tokens = tokens[:, tokens.shape[1] - grid_h * grid_w:]

    out_channels = 2 * channels if self.learn_sigma else channels
    out = FinalLayer(
        self.hidden_size, p * p * out_channels, self.conditioning, self.param_dtype,
        name="final_layer")(tokens, cond if adaptive else None)
    # Unpatchify: token (i, j) holds its p x p patch row-major, channels last (as DiT).
    out = einops.rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=grid_h, p=p, q=p)
    return out.astype(jnp.float32)

  def _embed_conditions(self, t, y, batch: int, train: bool) -> list[jnp.ndarray]:
    """[t_emb] or [t_emb, y_emb], each [B, D] float32."""
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    embeddings = [TimestepEmbedder(
        self.hidden_size, freq_shift=self.time_freq_shift, param_dtype=self.param_dtype,
        name="time_embed")(t)]
    if self.num_classes > 0:
      embeddings.append(LabelEmbedder(
          self.num_classes, self.hidden_size, self.class_dropout_prob,
          param_dtype=self.param_dtype, name="label_embed")(y, batch, train))
    return embeddings

  def _apply_blocks(self, tokens: jnp.ndarray, cond: jnp.ndarray | None) -> jnp.ndarray:
    """tokens: [B, T, D] float32 -> [B, T, D] float32 through `depth` blocks."""
    block_class = DiTBlock
    if self.remat:
      # scan already stops XLA from merging the recomputation into the forward pass, so the
      # extra CSE barrier would only cost speed there (Flax's advice for remat inside scan).
      block_class = nn.remat(DiTBlock, prevent_cse=not self.scan_blocks)
    fields = dict(
        hidden_size=self.hidden_size, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        conditioning=self.conditioning, mlp_norm_eps=self.mlp_norm_eps, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.scan_blocks:
      stack = nn.scan(
          block_class, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=nn.broadcast, length=self.depth)
      tokens, _ = stack(**fields, name="blocks")(tokens, cond)
      return tokens
    for i in range(self.depth):
      tokens, _ = block_class(**fields, name=f"block_{i}")(tokens, cond)
    return tokens


__all__ = ["DiT", "DiTBlock", "DIT_SIZES", "CONDITIONINGS", "sincos_2d_positions"]
