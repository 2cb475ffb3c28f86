"""Import of diffusers DiTTransformer2DModel checkpoints (jaxdiff/convert/dit.py).

The reference is diffusers itself on CPU torch: tiny randomly initialised models, every weight
randomised (adaLN-Zero's zeros would hide mistakes), per-block embedders tied as in published
checkpoints, saved with `save_pretrained` and read back with `load_diffusers`.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from jaxdiff.convert import dit as convert_dit
from jaxdiff.convert import load_diffusers, read_diffusers_folder

CONFIGS = {
    "learn_sigma_patch2": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5),
    # A large norm_eps makes the MLP LayerNorm's epsilon visible in the output.
    "patch4_eps": dict(
        num_attention_heads=3, attention_head_dim=8, in_channels=3, num_layers=3,
        sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_eps=0.5),
    "one_channel": dict(
        num_attention_heads=1, attention_head_dim=16, in_channels=1, out_channels=2,
        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=3),
}


def _save_diffusers_dit(path, config, seed=0, tie=True):
  """Saves a diffusers DiT with all weights ~ N(0, 0.15^2); returns the torch model."""
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(**config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.15)
    if tie:
      shared = model.transformer_blocks[0].norm1.emb.state_dict()
      for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dit"))
  _save_diffusers_dit(path, CONFIGS["learn_sigma_patch2"])
  return path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(tmp_path, name):
  config = CONFIGS[name]
  model = _save_diffusers_dit(str(tmp_path), config)
  rng = np.random.RandomState(1)
  size, channels = config["sample_size"], config["in_channels"]
  x = rng.randn(3, channels, size, size).astype(np.float32)
  # Fractional timesteps are allowed; the last label is the null (unconditional) class.
  t = np.array([0.0, 417.5, 999.0], np.float32)
  y = np.array([1, 0, config["num_embeds_ada_norm"]], np.int64)
  with torch.no_grad():
    expected = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample
  expected = expected.numpy().transpose(0, 2, 3, 1)
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  for scan_blocks in (False, True):
    module, params = load_diffusers(str(tmp_path), scan_blocks=scan_blocks)
    if scan_blocks:
      assert params["blocks"]["attn"]["qkv"]["kernel"].shape[0] == config["num_layers"]
    out = np.asarray(module.apply({"params": params}, x_nhwc, jnp.asarray(t), jnp.asarray(y)))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero outputs


def test_untied_block_embedders_are_an_error(tmp_path):
  _save_diffusers_dit(str(tmp_path), CONFIGS["learn_sigma_patch2"], tie=False)
  with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb"):
    load_diffusers(str(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("norm_type", "ada_norm"), ("activation_fn", "gelu"), ("attention_bias", False),
    ("norm_elementwise_affine", True), ("out_channels", 5), ("sample_size", 9)])
def test_unsupported_config_values_are_errors(saved_dit, tmp_path, field, value):
  weights = "diffusion_pytorch_model.safetensors"
  shutil.copy(os.path.join(saved_dit, weights), tmp_path / weights)
  with open(os.path.join(saved_dit, "config.json")) as f:
    config = json.load(f)
  config[field] = value
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=field):
    load_diffusers(str(tmp_path))


def test_missing_or_unexpected_weights_are_errors(saved_dit):
  config, state = read_diffusers_folder(saved_dit)
  missing = {k: v for k, v in state.items() if k != "proj_out_2.bias"}
  with pytest.raises(ValueError, match="proj_out_2.bias"):
    convert_dit.convert(config, missing)
  extra = dict(state, **{"transformer_blocks.0.attn2.to_q.weight": np.zeros((16, 16))})
  with pytest.raises(ValueError, match="attn2.to_q.weight"):
    convert_dit.convert(config, extra)
  assert "proj_out_2.bias" in state  # the caller's dict is not consumed


def test_overrides(saved_dit):
  with pytest.raises(ValueError, match="hidden_size"):
    load_diffusers(saved_dit, hidden_size=32)
  module, params = load_diffusers(saved_dit, dtype=jnp.bfloat16, remat=True)
  assert module.dtype == jnp.bfloat16 and module.remat
  assert params["final_layer"]["dense"]["kernel"].dtype == jnp.float32
  # The checkpoint's conventions are carried by the module's fields.
  assert module.time_freq_shift == 1.0 and module.mlp_norm_eps == 1e-5
  assert module.num_classes == 5 and module.learn_sigma
  assert params["label_embed"]["embedding"].shape == (6, 16)
