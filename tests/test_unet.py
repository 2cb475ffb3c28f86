"""UNet behaviour: sizes, shapes, dropout and label dropout, null labels, bfloat16, init.

Numerical equality with diffusers' UNet2DModel lives in test_convert_unet.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.unet import UNET_SIZES, UNet

NUM_CLASSES = 3


def _key(seed):
  # RngBitGenerator keys: the same semantics, much less XLA compile time on CPU than threefry.
  return jax.random.key(seed, impl="rbg")


def _apply(model, params, x, t, y, key=None, train=False):
  return model.apply(params, x, t, y, train=train, rngs=None if key is None else {"dropout": key})


def _abstract_params(model, x, t, y=None):
  return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def _random_params(model, x, t, y, seed=0):
  """Random float32 params of the module's shapes (no zero-init branches; no init compile)."""
  rng = np.random.default_rng(seed)
  abstract = _abstract_params(model, x, t, y)

  def fill(path, leaf):
    noise = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0))

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def conditional():
  """A one-level conditional unet-tiny: null row, dropout 0.5, random params, an 8x8 batch.

  One level (5 ResBlocks, mid attention) keeps the CPU compile time of these tests down; the
  full layouts are exercised against diffusers in test_convert_unet.py.
  """
  model = UNet(**{**UNET_SIZES["unet-tiny"], "channel_mult": (1,), "attention_levels": (),
                  "num_classes": NUM_CLASSES, "class_dropout_prob": 0.5, "dropout": 0.5})
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([0, 10, 100, 250, 500, 750, 900, 999], jnp.int32)
  y = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
  params = {"params": _random_params(model, x, t, y)}
  return model, params, x, t, y


def test_ddpm_cifar10_has_35_7m_parameters():
  model = UNet(**UNET_SIZES["unet-ddpm-cifar10"])
  abstract = _abstract_params(model, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert abs(count - 35.7e6) < 0.1e6  # Ho et al. 2020, section 4


def test_small_preset_is_a_few_million_parameters():
  model = UNet(**UNET_SIZES["unet-small"])
  abstract = _abstract_params(model, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert 1e6 < count < 10e6


@pytest.mark.parametrize("height, width, channels, learn_sigma, out_channels, expected", [
    (16, 16, 1, False, 0, 1),
    (32, 32, 3, False, 0, 3),
    (16, 16, 3, True, 0, 6),
    (32, 32, 1, True, 0, 2),
    (16, 32, 3, False, 4, 4),
    (16, 16, 3, True, 4, 8),
])
def test_output_shape_and_dtype(height, width, channels, learn_sigma, out_channels, expected):
  model = UNet(**{**UNET_SIZES["unet-tiny"], "learn_sigma": learn_sigma,
                  "out_channels": out_channels, "dtype": jnp.bfloat16})
  x = jnp.zeros((2, height, width, channels))
  t = jnp.zeros((2,), jnp.int32)
  out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
  assert out.shape == (2, height, width, expected)
  assert out.dtype == jnp.float32  # even with bfloat16 compute


@pytest.mark.parametrize("channel_mult, size", [((1, 2), 15), ((1, 2, 2), 6), ((1, 2, 2), 10)])
def test_image_size_not_divisible_is_an_error(channel_mult, size):
  model = UNet(**{**UNET_SIZES["unet-tiny"], "channel_mult": channel_mult})
  with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(levels-1\\)"):
    _abstract_params(model, jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))


def test_zero_init_starts_at_zero_output():
  """conv_out, every ResBlock's conv_2 and attention `out` start at zero (DDPM / ADM)."""
  # One level keeps the (slow to compile) initialisation small: 5 ResBlocks, mid attention.
  model = UNet(**{**UNET_SIZES["unet-tiny"], "channel_mult": (1,), "attention_levels": ()})
  init = jax.jit(model.init_with_output)
  out, variables = init(_key(0), jnp.ones((1, 4, 4, 3)), jnp.ones((1,)))
  np.testing.assert_array_equal(out, 0.0)
  flat = {jax.tree_util.keystr(p): a
          for p, a in jax.tree_util.tree_leaves_with_path(variables["params"])}
  zero = [k for k in flat if "['kernel']" in k and (
      "['conv_2']" in k or "['out']" in k or k.startswith("['conv_out']"))]
  assert len(zero) == 5 + 1 + 1  # 5 ResBlocks, the mid attention, conv_out
  for k in zero:
    np.testing.assert_array_equal(flat[k], 0.0, err_msg=k)
  assert np.abs(flat["['mid_res_0']['conv_1']['kernel']"]).max() > 0


def test_dropout_only_in_train_mode(conditional):
  model, params, x, t, y = conditional
  no_dropout = model.clone(dropout=0.0)
  evaluated = _apply(model, params, x, t, y)
  # Eval with dropout 0.5 is the same function as a model without dropout.
  np.testing.assert_array_equal(evaluated, _apply(no_dropout, params, x, t, y))
  trained = [_apply(model, params, x, t, y, _key(k), train=True)
             for k in (1, 2)]
  assert np.abs(trained[0] - evaluated).max() > 1e-2
  assert np.abs(trained[0] - trained[1]).max() > 1e-2


def test_label_dropout_uses_the_null_row(conditional):
  model, params, x, t, y = conditional
  assert params["params"]["class_embed"]["embedding"].shape[0] == NUM_CLASSES + 1
  labels_only = model.clone(dropout=0.0)  # isolates label dropout from feature dropout
  with_labels = _apply(labels_only, params, x, t, y)
  null = _apply(labels_only, params, x, t, None)
  np.testing.assert_array_equal(
      null, _apply(labels_only, params, x, t, jnp.full_like(y, NUM_CLASSES)))
  assert np.abs(null - with_labels).max() > 1e-2  # labels matter

  trained = _apply(labels_only, params, x, t, y, _key(3), train=True)
  per_example = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(axis=(1, 2, 3))
  is_null = per_example(trained, null) < 1e-6
  is_label = per_example(trained, with_labels) < 1e-6
  assert np.all(is_null ^ is_label)  # each example kept its label or got exactly the null row
  assert is_null.any() and is_label.any()  # p = 0.5 on 8 examples


def test_null_label_rules():
  x, t, y = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
  unconditional = UNet(**UNET_SIZES["unet-tiny"])
  assert jax.eval_shape(lambda: unconditional.apply(
      unconditional.init(jax.random.key(0), x, t, None), x, t)).shape == x.shape
  with pytest.raises(ValueError, match="unconditional"):
    _abstract_params(unconditional, x, t, y)
  no_null_row = UNet(**UNET_SIZES["unet-tiny"], num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="no null row"):
    _abstract_params(no_null_row, x, t, None)
  table = _abstract_params(no_null_row, x, t, y)["class_embed"]["embedding"]
  assert table.shape[0] == NUM_CLASSES


def test_bfloat16_compute_is_close_to_float32(conditional):
  model, params, x, t, y = conditional
  reference = _apply(model, params, x, t, y)
  low = _apply(model.clone(dtype=jnp.bfloat16), params, x, t, y)
  assert low.dtype == jnp.float32
  assert np.all(np.isfinite(low))
  scale = np.abs(reference).max()
  assert np.abs(low - reference).max() < 0.05 * scale
