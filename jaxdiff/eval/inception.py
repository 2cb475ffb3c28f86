"""The FID Inception-v3 network (the TensorFlow 2015-12-05 graph) in Flax.

This is the network of the TF FID code (TTUR), ported to PyTorch by pytorch-fid and
torch-fidelity: torchvision's Inception-v3 with the FID graph's quirks. Submodule names follow
torchvision's (`Conv2d_1a_3x3`, `Mixed_5b/branch1x1`, `fc`), so the converted `.pth` weights map
onto the parameters name by name (see `weights.py`).

The input pipeline reproduces torch-fidelity's: uint8 images are resized to 299x299 with
TF1-style bilinear interpolation (`align_corners=False`, no half-pixel centres), then scaled as
`(x - 128) / 128`. Other resizes (PIL, `jax.image.resize`, torch's `interpolate`) move FID.
Every conv and the classifier run at `Precision.HIGHEST`, so FID does not depend on whether
the accelerator would otherwise use bf16 passes (TPU) or TF32 (A100/H100).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008  # The TF graph's classifier: 1000 ImageNet classes + 8 unused.
# ADM's sFID features: the TF graph's `mixed_6/conv:0`, i.e. the ReLU output of Mixed_6d's 1x1
# branch (torch-fidelity's TF -> torch weight map names mixed_4..mixed_7 Mixed_6b..Mixed_6e),
# [B, 17, 17, 192], of which ADM keeps the first 7 channels, flattened in (h, w, c) order.
SPATIAL_CHANNELS = 7
_PRECISION = jax.lax.Precision.HIGHEST


def _tf1_resize_grid(in_size: int, out_size: int):
  """Source indices and weights of TF1 bilinear resizing along one axis.

  TF1 (`align_corners=False`, no half-pixel centres) samples output pixel i at source
  coordinate `i * in_size / out_size`, computed in float32 as torch-fidelity does.

  Returns:
    lo, hi: int32 [out_size] neighbouring source indices; frac: float32 [out_size] weights.
  """
  scale = np.float32(in_size / out_size)
  coord = np.arange(out_size, dtype=np.float32) * scale
  lo = coord.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = coord - lo.astype(np.float32)
  return lo.astype(np.int32), hi.astype(np.int32), frac


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize as TensorFlow 1.x `tf.image.resize_bilinear(align_corners=False)`.

  Interpolates along width first, then height, in the same float32 operation order as
  torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method "slow").

  Args:
    images: float32 [B, H, W, C].
    size: (out_height, out_width).

  Returns:
    float32 [B, out_height, out_width, C].
  """
  y_lo, y_hi, dy = _tf1_resize_grid(images.shape[1], size[0])
  x_lo, x_hi, dx = _tf1_resize_grid(images.shape[2], size[1])
  rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
  dx = dx[None, None, :, None]
  top = rows_lo[:, :, x_lo] + (rows_lo[:, :, x_hi] - rows_lo[:, :, x_lo]) * dx
  bottom = rows_hi[:, :, x_lo] + (rows_hi[:, :, x_hi] - rows_hi[:, :, x_lo]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


def preprocess(images_uint8: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1), the FID graph's input."""
  x = tf1_resize_bilinear(images_uint8.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=_PRECISION, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pooling ignores the zero padding (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, col[0], padding=col[1], name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, row[0], padding=row[1], name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, col[0], padding=col[1], name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 branches.

  The FID graph's last block (`Mixed_7c`) max-pools in its pool branch where the paper
  average-pools; `pool="max"` reproduces that.
  """
  pool: str = "avg"  # "avg" | "max"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 2048 -> 1008 classifier, returning logits without and with the bias."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (pool.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.dot(pool, kernel, precision=_PRECISION)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """FID Inception-v3 on preprocessed images.

  Attributes:
    with_logits: also compute the 1008-way classifier (needed for the Inception Score).
    with_spatial: also return ADM's spatial features (needed for sFID).
  """
  with_logits: bool = True
  with_spatial: bool = True

  @nn.compact
  def __call__(self, x):
    """Args: x: float32 [B, 299, 299, 3] from `preprocess`.

    Returns:
      {"pool": [B, 2048] (FID/KID/PR features), with logits "logits_unbiased": [B, 1008]
      (`pool @ W`, the logits of the original Inception Score code) and "logits": [B, 1008],
      and with spatial features "spatial": [B, 17 * 17 * 7] (ADM's sFID features: the first 7
      channels of Mixed_6d's 1x1 branch, the 1x1 branch being the first 192 channels of
      Mixed_6d's output, flattened as TF's NHWC reshape)}.
    """
    x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                           ("Mixed_6e", 192)):
      x = InceptionC(channels, name=name)(x)
      if name == "Mixed_6d":
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    out = {"pool": pool}
    if self.with_spatial:
      out["spatial"] = spatial
    if self.with_logits:
      out["logits_unbiased"], out["logits"] = Classifier(name="fc")(pool)
    return out


@functools.lru_cache(maxsize=None)
def variable_shapes(with_logits: bool = True):
  """The pytree of variable shapes ({"params", "batch_stats"}) the network expects."""
  model = InceptionV3(with_logits=with_logits)
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)
