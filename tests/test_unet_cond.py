"""UNetCond behaviour: shapes, zero init, text conditioning, dropout, bfloat16, input errors.

Numerical equality with diffusers' UNet2DConditionModel lives in test_convert_unet_cond.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.transformer import SpatialTransformer
from jaxdiff.models.unet_cond import UNET_COND_SIZES, UNetCond

# One level keeps compile time down; both paths and the mid block still hold transformers.
ONE_LEVEL = dict(UNET_COND_SIZES["unet-cond-tiny"], widths=(32,), num_heads=(2,), dropout=0.5)


def _random_params(model, x, t, context, seed=0):
  """Random float32 params of the module's shapes (no zero-init branches)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t, context)["params"]

  def fill(path, leaf):
    noise = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0))

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def setup():
  model = UNetCond(**ONE_LEVEL)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
  t = jnp.asarray([0.0, 500.5, 999.0])
  context = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
  params = {"params": _random_params(model, x, t, context)}
  apply = jax.jit(model.apply, static_argnames="train")  # one compile per `train` value
  return apply, params, x, t, context


def test_text_conditions_each_row_independently(setup):
  apply, params, x, t, context = setup
  out = apply(params, x, t, context)
  changed = apply(params, x, t, context.at[1].multiply(-1.0))
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(changed[0], out[0])
  np.testing.assert_array_equal(changed[2], out[2])
  assert np.abs(np.asarray(changed[1] - out[1])).max() > 1e-2
  # Any text length works: the context is only attended to (shapes only: no second compile).
  longer = jax.eval_shape(apply, params, x, t, jnp.concatenate([context, context[:, :1]], 1))
  assert longer.shape == out.shape


@pytest.mark.slow  # one more compile; ResBlock dropout itself is tested in test_unet.py
def test_dropout_only_in_training(setup):
  apply, params, x, t, context = setup
  first = apply(params, x, t, context, train=True, rngs={"dropout": jax.random.key(0)})
  second = apply(params, x, t, context, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(first - second)).max() > 1e-3
  np.testing.assert_array_equal(apply(params, x, t, context), apply(params, x, t, context))


def test_zero_init_transformer_starts_as_identity():
  """Every residual branch of a SpatialTransformer is zero-initialised (as UNet's, whose
  zero-output start is tested in test_unet.py); init of the whole U-Net compiles too slowly."""
  block = SpatialTransformer(num_heads=2, num_layers=2, norm_groups=8)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 32)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  params = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x, context)
  np.testing.assert_array_equal(jax.jit(block.apply)(params, x, context), x)


def test_out_channels_and_cross_attention_shapes():
  model = UNetCond(**{**ONE_LEVEL, "out_channels": 3})
  x, t, context = jnp.ones((1, 4, 4, 4)), jnp.zeros((1,)), jnp.ones((1, 2, 8))
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, context)["params"]
  assert jax.eval_shape(model.apply, {"params": params}, x, t, context).shape == (1, 4, 4, 3)
  # Cross-attention keys project the 8-wide text to the level's width, without bias (diffusers).
  key = params["mid_attn"]["block_0"]["cross_attn"]["key"]
  assert key["kernel"].shape == (8, 32) and "bias" not in key


@pytest.mark.slow  # one more compile
def test_bfloat16_compute_is_close_to_float32(setup):
  apply, params, x, t, context = setup
  reference = apply(params, x, t, context)
  half = jax.jit(UNetCond(**{**ONE_LEVEL, "dtype": jnp.bfloat16}).apply)(params, x, t, context)
  assert half.dtype == jnp.float32
  error = np.abs(np.asarray(half - reference)).max() / np.abs(np.asarray(reference)).max()
  assert 0 < error < 0.05


@pytest.mark.parametrize("fields, x_shape, context_shape, match", [
    ({"widths": (32, 64), "num_heads": (2, 4)}, (1, 7, 8, 4), (1, 2, 16), "divisible"),
    ({"widths": (32, 64)}, (1, 8, 8, 4), (1, 2, 16), "num_heads"),
    ({}, (1, 8, 8, 4), (2, 2, 16), "context"),
    ({"cross_attention_levels": (1,)}, (1, 8, 8, 4), (1, 2, 16), "cross_attention_levels"),
    ({"norm_groups": 5}, (1, 8, 8, 4), (1, 2, 16), "norm_groups"),
])
def test_bad_inputs_are_named(fields, x_shape, context_shape, match):
  model = UNetCond(**{**ONE_LEVEL, **fields})
  x = jnp.zeros(x_shape)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros(context_shape))
