"""Tests of the DiT backbone (jaxdiff/models/dit.py) against closed forms and diffusers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from jaxdiff.models import build_model
from jaxdiff.models.dit import CONDITIONINGS, DIT_SIZES, DiT, DiTBlock, sincos_2d_positions

TINY = DIT_SIZES["dit-tiny"]


def _random_params(model, x, t, y=None, seed=0, scale=0.1):
  """Parameters of `model` drawn i.i.d. N(0, scale^2) in NumPy, zero-initialised ones included
  (cheaper than compiling `init`, and adaLN-Zero's zeros would hide the conditioning)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.randn(*s.shape), s.dtype), shapes)


def _inputs(batch=2, size=8, channels=3, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, size, size, channels).astype(np.float32)
  t = rng.randint(0, 1000, size=batch).astype(np.int32)
  y = rng.randint(0, 3, size=batch).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _dit_param_count(depth, width, patch, channels=4, num_classes=1000):
  """Closed form for adaLN-Zero DiT with learn_sigma and a null label row (no pos-embed)."""
  block = (4 * width * width + 4 * width          # qkv + attention output
           + 8 * width * width + 5 * width        # MLP 4x
           + 6 * width * width + 6 * width)       # adaLN-Zero modulation
  patch_embed = patch * patch * channels * width + width
  time_embed = 256 * width + width + width * width + width
  label_embed = (num_classes + 1) * width
  out = patch * patch * 2 * channels
  final = 2 * width * width + 2 * width + width * out + out
  return depth * block + patch_embed + time_embed + label_embed + final


# Table 4 of Peebles & Xie (2023), millions; their count includes the frozen 256 x D pos-embed.
@pytest.mark.parametrize("name,paper_millions", [
    ("dit-s/2", 33.0), ("dit-b/2", 130.5), ("dit-l/2", 458.0), ("dit-xl/2", 675.0)])
def test_param_counts_match_paper(name, paper_millions):
  model = build_model(name, num_classes=1000, class_dropout_prob=0.1, learn_sigma=True)
  x, t = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, t))
  count = _count(shapes["params"])
  fields = DIT_SIZES[name]
  assert count == _dit_param_count(fields["depth"], fields["hidden_size"], fields["patch_size"])
  num_tokens = (32 // fields["patch_size"]) ** 2
  assert abs((count + num_tokens * fields["hidden_size"]) / 1e6 - paper_millions) < 0.15
  if name == "dit-xl/2":
    # The original DiT training script logs "DiT Parameters: 675,129,632" for XL/2.
    assert count + num_tokens * fields["hidden_size"] == 675_129_632


def test_size_table_names():
  expected = {f"dit-{s}/{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)} | {"dit-tiny"}
  assert set(DIT_SIZES) == expected
  assert DIT_SIZES["dit-l/4"] == dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4)


@pytest.mark.parametrize("dim,grid,base", [(16, (4, 4), None), (32, (3, 5), None),
                                           (16, (6, 6), 4), (24, (2, 4), 3)])
def test_sincos_positions_match_diffusers(dim, grid, base):
  got = sincos_2d_positions(dim, grid[0], grid[1], base)
  assert got.shape == (grid[0] * grid[1], dim) and got.dtype == np.float32
  if base is not None or grid[0] == grid[1]:
    # diffusers always rescales to a base size; a square grid of base size is DiT's layout.
    expected = get_2d_sincos_pos_embed(dim, grid, base_size=base or grid[0]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
  # Closed form for token (row i, col j), channel k < dim/4: sin(j * 10000^(-k / (dim/4))).
  i, j = grid[0] - 1, grid[1] - 1
  scale_h = base / grid[0] if base else 1.0
  scale_w = base / grid[1] if base else 1.0
  omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  token = got[i * grid[1] + j]
  np.testing.assert_allclose(token[:dim // 4], np.sin(j * scale_w * omega), atol=1e-6)
  np.testing.assert_allclose(token[3 * dim // 4:], np.cos(i * scale_h * omega), atol=1e-6)


def test_adaln_zero_blocks_are_identity_at_init():
  model = DiT(**TINY, num_classes=3, class_dropout_prob=0.1)
  x, t, y = _inputs()
  params = model.init(jax.random.key(0), x, t, y)["params"]
  block = DiTBlock(TINY["hidden_size"], TINY["num_heads"])
  rng = np.random.RandomState(1)
  tokens = jnp.asarray(rng.randn(2, 16, TINY["hidden_size"]).astype(np.float32))
  cond = jnp.asarray(rng.randn(2, TINY["hidden_size"]).astype(np.float32))
  for i in range(TINY["depth"]):
    out, _ = block.apply({"params": params[f"block_{i}"]}, tokens, cond)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tokens))
  # The zero-initialised output layer makes the whole model predict 0 at init.
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x, t, y)), 0.0)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_variants_use_labels_and_timesteps(conditioning):
  model = DiT(**TINY, num_classes=3, class_dropout_prob=0.1, conditioning=conditioning)
  x, t, y = _inputs()
  params = _random_params(model, x, t, y, seed=1)
  def apply(t, y):
    return model.apply({"params": params}, x, t, y)
  with_labels, without_labels = apply(t, y), apply(t, None)
  null_labels = apply(t, jnp.full_like(y, 3))
  other_t = apply(t + 7, y)
  for out in (with_labels, without_labels):
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(without_labels), np.asarray(null_labels))
  # float32 noise is ~1e-7; an ignored label or timestep would give exactly 0.
  assert np.abs(np.asarray(with_labels - without_labels)).max() > 1e-5
  assert np.abs(np.asarray(with_labels - other_t)).max() > 1e-5

  unconditional = DiT(**TINY, conditioning=conditioning, learn_sigma=True)
  params = _random_params(unconditional, x, t)
  assert "label_embed" not in params
  out = unconditional.apply({"params": params}, x, t)
  assert out.shape == (2, 8, 8, 6) and np.isfinite(np.asarray(out)).all()


def test_label_dropout_replaces_labels_with_null():
  model = DiT(**TINY, num_classes=3, class_dropout_prob=1.0)
  x, t, y = _inputs()
  params = _random_params(model, x, t, y, seed=2)
  variables = {"params": params}
  dropped = model.apply(variables, x, t, y, train=True, rngs={"dropout": jax.random.key(3)})
  null = model.apply(variables, x, t, None)
  kept = model.apply(variables, x, t, y)
  np.testing.assert_allclose(np.asarray(dropped), np.asarray(null), atol=1e-6)
  assert np.abs(np.asarray(kept - null)).max() > 1e-3
  # Without dropout probability, train=True leaves labels untouched and needs no rng.
  no_drop = dataclasses.replace(model, class_dropout_prob=0.0)
  params_no_null = dict(params, label_embed={"embedding": params["label_embed"]["embedding"][:3]})
  out = no_drop.apply({"params": params_no_null}, x, t, y, train=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(kept), atol=1e-6)


def test_null_label_without_null_row_is_an_error():
  model = DiT(**TINY, num_classes=3)
  x, t, y = _inputs()
  variables = model.init(jax.random.key(0), x, t, y)
  with pytest.raises(ValueError, match="class_dropout_prob"):
    model.apply(variables, x, t, None)


def test_bfloat16_compute_close_to_float32():
  model = DiT(**TINY, num_classes=3, class_dropout_prob=0.1, learn_sigma=True)
  x, t, y = _inputs()
  params = _random_params(model, x, t, y, seed=4, scale=0.2)
  reference = np.asarray(model.apply({"params": params}, x, t, y))
  out = jax.jit(dataclasses.replace(model, dtype=jnp.bfloat16).apply)({"params": params}, x, t, y)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  error = np.abs(np.asarray(out) - reference).max()
  assert error < 0.03 * np.abs(reference).max(), error
  assert error > 0  # bf16 was really used


@pytest.mark.parametrize("conditioning", ["in_context", "cross_attn"])
def test_scan_and_remat_match_unrolled_blocks(conditioning):
  model = DiT(**TINY, num_classes=3, class_dropout_prob=0.1, conditioning=conditioning)
  x, t, y = _inputs()
  params = _random_params(model, x, t, y, seed=5)
  reference = np.asarray(model.apply({"params": params}, x, t, y))
  scanned = dataclasses.replace(model, scan_blocks=True, remat=True)
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["blocks"] = jax.tree.map(
      lambda *b: jnp.stack(b), *[params[f"block_{i}"] for i in range(TINY["depth"])])
  expected_shapes = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, t, y))["params"]
  assert jax.tree.map(lambda a: a.shape, expected_shapes) == jax.tree.map(
      lambda a: a.shape, stacked)
  np.testing.assert_allclose(
      np.asarray(scanned.apply({"params": stacked}, x, t, y)), reference, atol=1e-5)


@pytest.mark.parametrize("height,width,patch,channels,learn_sigma", [
    (8, 8, 2, 3, False), (16, 8, 4, 1, True), (12, 12, 4, 4, True), (6, 10, 2, 2, False),
    (32, 32, 8, 4, True), (4, 4, 1, 3, False)])
def test_output_shapes(height, width, patch, channels, learn_sigma):
  model = DiT(**dict(TINY, patch_size=patch), num_classes=5, learn_sigma=learn_sigma)
  x = jnp.zeros((3, height, width, channels))
  t = jnp.zeros((3,), jnp.float32)
  y = jnp.zeros((3,), jnp.int32)

  def run():
    variables = model.init(jax.random.key(0), x, t, y)
    return model.apply(variables, x, t, y)
  out = jax.eval_shape(run)
  assert out.shape == (3, height, width, 2 * channels if learn_sigma else channels)
  assert out.dtype == jnp.float32


def test_image_size_not_divisible_by_patch_is_an_error():
  model = DiT(**dict(TINY, patch_size=4))
  x, t = jnp.zeros((1, 10, 12, 3)), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match=r"10x12.*patch_size=4"):
    model.init(jax.random.key(0), x, t)


def test_unknown_conditioning_is_an_error():
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="conditioning"):
    DiT(**TINY, conditioning="film").init(jax.random.key(0), x, t)

