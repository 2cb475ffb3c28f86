"""Tests of jaxdiff.models.layers: the sinusoidal timestep embedding against diffusers'
`get_timestep_embedding` (torch, float32) and against its closed form in float64 NumPy; the
attention core against float64 NumPy and torch's scaled_dot_product_attention; GroupNorm's
values and gradients against torch's group_norm in float64."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

import flax.linen
import jax

from jaxdiff.models.layers import Dense, GroupNorm, attention, timestep_embedding

# Integer and fractional timesteps, including 998.4, which a bfloat16 cast would turn into 1000.
TIMESTEPS = np.array([0.0, 1.0, 0.5, 17.25, 499.0, 998.4, 999.0], np.float32)


def closed_form(t, dim, max_period=10000.0, flip_sin_to_cos=True, freq_shift=0.0, scale=1.0):
  """[B, dim] float64: [sin, cos] (or [cos, sin]) of t * scale * max_period^(-i / (half - shift))."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift))
  args = np.asarray(t, np.float64)[:, None] * freqs[None, :] * scale
  parts = [np.cos(args), np.sin(args)] if flip_sin_to_cos else [np.sin(args), np.cos(args)]
  return np.pad(np.concatenate(parts, axis=-1), ((0, 0), (0, dim % 2)))


VARIANTS = [  # (dim, flip_sin_to_cos, freq_shift, scale, max_period)
    (64, True, 0.0, 1.0, 10000.0),  # original DiT, diffusers' UNet2DModel
    (64, True, 1.0, 1.0, 10000.0),  # diffusers' DiT
    (64, False, 1.0, 1.0, 10000.0),  # diffusers' default arguments
    (64, False, 0.0, 1.0, 10000.0),
    (33, True, 1.0, 1.0, 10000.0),  # odd width: a zero column
    (32, True, 0.0, 1000.0, 10000.0),  # scale, as for timesteps in [0, 1]
    (16, False, 0.5, 2.0, 100.0),
]


@pytest.mark.parametrize("dim,flip,shift,scale,max_period", VARIANTS)
def test_matches_diffusers_get_timestep_embedding(dim, flip, shift, scale, max_period):
  t = TIMESTEPS / 1000 if scale == 1000.0 else TIMESTEPS
  expected = get_timestep_embedding(
      torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
      max_period=max_period).numpy()
  got = timestep_embedding(jnp.asarray(t), dim, max_period=max_period, flip_sin_to_cos=flip,
                           freq_shift=shift, scale=scale)
  assert got.dtype == jnp.float32 and got.shape == (len(t), dim)
  # Same float32 formula; sin/cos of arguments up to ~1000 differ by a few float32 ulps of the
  # argument between XLA and torch (max seen 6e-5).
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dim,flip,shift,scale,max_period", VARIANTS)
def test_matches_the_float64_closed_form(dim, flip, shift, scale, max_period):
  t = TIMESTEPS / 1000 if scale == 1000.0 else TIMESTEPS
  got = timestep_embedding(jnp.asarray(t), dim, max_period=max_period, flip_sin_to_cos=flip,
                           freq_shift=shift, scale=scale)
  expected = closed_form(t, dim, max_period, flip, shift, scale)
  # float32 arguments up to ~1000 carry an absolute error of a few 1000 * 2^-24 (max seen 5e-5).
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)
  if dim % 2:
    assert np.all(np.asarray(got)[:, -1] == 0)


def test_integer_and_fractional_timesteps_give_float32_without_rounding():
  ints = timestep_embedding(jnp.array([0, 3, 999], jnp.int32), 8)
  assert ints.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ints), closed_form([0, 3, 999], 8), rtol=0, atol=1e-4)
  fractional = np.asarray(timestep_embedding(jnp.array([998.4], jnp.float32), 128))
  np.testing.assert_allclose(fractional, closed_form([998.4], 128), rtol=0, atol=1e-4)
  # A bfloat16 timestep would be 1000: the lowest frequencies tell the two apart.
  assert np.abs(fractional - closed_form([1000.0], 128)).max() > 0.1
  np.testing.assert_array_equal(np.asarray(timestep_embedding(jnp.array([0.0]), 6)),
                                [[1, 1, 1, 0, 0, 0]])  # cos(0) first, then sin(0)


def attention_float64(q, k, v, keep):
  """[B, T, H, D] float64 softmax(q k^T / sqrt(D)) v with keep [B, T, S] (False: key ignored)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(keep[:, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_attention_matches_float64_softmax(masked, causal):
  rng = np.random.default_rng(0)
  batch, length, heads, dim = 2, 7, 3, 8
  q, k, v = (rng.normal(size=(batch, length, heads, dim)).astype(np.float32) * 2 for _ in range(3))
  mask = np.ones((batch, length), bool)
  if masked:
    mask[0, 4:] = False  # padding at the end of the first sequence
    mask[1, 6:] = False  # (left padding with a causal mask would leave a row with no key)
  keep = np.broadcast_to(mask[:, None, :], (batch, length, length))
  if causal:
    keep = keep & np.tril(np.ones((length, length), bool))
  with jax.default_matmul_precision("highest"):
    out = attention(q, k, v, mask=jnp.asarray(mask) if masked else None, is_causal=causal)
  np.testing.assert_allclose(out, attention_float64(q, k, v, keep), rtol=1e-5, atol=1e-5)


def test_attention_matches_torch_sdpa_and_keeps_bfloat16():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 16, 4, 32)).astype(np.float32) for _ in range(3))
  expected = torch.nn.functional.scaled_dot_product_attention(
      *(torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))).transpose(1, 2).numpy()
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(attention(q, k, v), expected, rtol=1e-5, atol=1e-5)
  low = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), expected, atol=0.05)


# (input shape [B, ..., C], groups): the U-Net's 32 groups, groups of one channel and of all
# channels, a non-square image, tokens [B, T, C] and a single position per example.
GROUP_NORM_CASES = [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 6, 6, 8), 8),
                    ((2, 6, 6, 8), 1), ((2, 10, 6), 2), ((4, 1, 1, 16), 4)]


def _torch_group_norm_float64(x, scale, bias, groups, eps, cotangent):
  """torch's group_norm on [B, C, ...] in float64: (output, d<out, cotangent>/d(x, scale, bias))
  as channels-last NumPy."""
  to_torch = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).astype(np.float64))
  xt = to_torch(x).requires_grad_()
  st = torch.from_numpy(scale.astype(np.float64)).requires_grad_()
  bt = torch.from_numpy(bias.astype(np.float64)).requires_grad_()
  out = torch.nn.functional.group_norm(xt, groups, st, bt, eps)
  (out * to_torch(cotangent)).sum().backward()
  back = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)
  return back(out), (back(xt.grad), st.grad.numpy(), bt.grad.numpy())


@pytest.mark.parametrize("shape,groups", GROUP_NORM_CASES)
def test_group_norm_and_its_gradient_match_torch_in_float64(shape, groups):
  rng = np.random.default_rng(sum(shape) + groups)
  # A large offset against a small spread: E[x^2] - E[x]^2 would lose most digits here.
  x = (rng.normal(size=shape) * 0.5 + 20.0).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
  bias = rng.normal(size=shape[-1]).astype(np.float32)
  cotangent = rng.normal(size=shape).astype(np.float32)
  expected, expected_grads = _torch_group_norm_float64(x, scale, bias, groups, 1e-6, cotangent)

  layer = GroupNorm(num_groups=groups, epsilon=1e-6)
  params = {"params": {"scale": scale, "bias": bias}}
  loss = lambda p, x: jnp.sum(layer.apply(p, x) * cotangent)
  grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)

  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=0, atol=2e-5)
  # The closed-form backward: float32 against float64, relative to each gradient's size.
  for got, want in ((grad_x, expected_grads[0]), (grad_params["params"]["scale"], expected_grads[1]),
                    (grad_params["params"]["bias"], expected_grads[2])):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max() + 1e-6)


def test_group_norm_keeps_flax_parameters_and_dtypes():
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 8)).astype(np.float32)
  layer = GroupNorm(num_groups=4, epsilon=1e-5)
  params = layer.init(jax.random.key(0), x)
  reference = flax.linen.GroupNorm(num_groups=4, epsilon=1e-5, use_fast_variance=False)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference.init(
      jax.random.key(0), x))
  # bfloat16 activations: statistics in float32, the output in the layer's dtype.
  half = layer.clone(dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), layer.apply(params, x), atol=0.05)
  with pytest.raises(ValueError, match="do not split into 3 groups"):
    GroupNorm(num_groups=3).init(jax.random.key(0), x)


def test_token_dense_and_its_gradients_match_float64_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  kernel = rng.normal(size=(8, 6)).astype(np.float32)
  bias = rng.normal(size=6).astype(np.float32)
  cotangent = rng.normal(size=(2, 5, 3, 6)).astype(np.float32)
  layer = Dense(6)
  params = {"params": {"kernel": kernel, "bias": bias}}
  # The same parameter tree as flax's layer, so checkpoints and weight import carry over.
  assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, flax.linen.Dense(6).init(jax.random.key(0), x))

  loss = lambda p, x: jnp.sum(layer.apply(p, x) * cotangent)
  with jax.default_matmul_precision("highest"):
    out = layer.apply(params, x)
    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
  x64, k64, c64 = x.astype(np.float64), kernel.astype(np.float64), cotangent.astype(np.float64)
  np.testing.assert_allclose(out, x64 @ k64 + bias, rtol=0, atol=1e-5)
  np.testing.assert_allclose(grad_x, c64 @ k64.T, rtol=0, atol=1e-5)
  np.testing.assert_allclose(grad_params["params"]["kernel"],
                             np.einsum("abci,abco->io", x64, c64), rtol=0, atol=1e-4)
  np.testing.assert_allclose(grad_params["params"]["bias"], c64.sum((0, 1, 2)), rtol=0, atol=1e-5)


def test_token_dense_weight_gradient_needs_no_transposed_copy():
  """The reason for the layer: on [B, T, D] tokens, flax's Dense makes XLA:CPU copy the output
  gradient into a transposed layout for the weight gradient; on flattened tokens it does not."""
  x = jnp.ones((4, 16, 8))
  layer = Dense(32)
  params = layer.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply(p, x)) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  instructions = [line for line in hlo.splitlines() if " = " in line]
  assert not [line for line in instructions if " copy(" in line or " transpose(" in line]
