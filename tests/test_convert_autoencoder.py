"""diffusers AutoencoderKL -> jaxdiff AutoencoderKL: posterior and decoder equal diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jaxdiff.convert import autoencoder as convert_autoencoder
from jaxdiff.convert import load_diffusers
from jaxdiff.models.autoencoder import AUTOENCODER_SIZES, AutoencoderKL


def _blocks(levels: int) -> dict:
  return dict(down_block_types=("DownEncoderBlock2D",) * levels,
              up_block_types=("UpDecoderBlock2D",) * levels)


CONFIGS = {
    # One level (no resampling), 8 channels, 2 groups, 3 -> 4 latent channels.
    "one_level": dict(_blocks(1), block_out_channels=(8,), layers_per_block=1,
                      latent_channels=4, norm_num_groups=2),
    # Two levels of different widths (shortcut convs), two layers, grayscale, SD3-like shift.
    "two_levels_shift": dict(_blocks(2), in_channels=1, out_channels=1,
                             block_out_channels=(8, 16), layers_per_block=2, latent_channels=3,
                             norm_num_groups=4, scaling_factor=1.5, shift_factor=0.25),
    # Flux / SD3-style: no quant convs; no mid attention; 16 latent channels.
    "no_quant_no_attention": dict(_blocks(2), block_out_channels=(16, 16), layers_per_block=1,
                                  latent_channels=16, norm_num_groups=8, use_quant_conv=False,
                                  use_post_quant_conv=False, mid_block_add_attention=False),
    # Three levels, post-quant conv only.
    "three_levels": dict(_blocks(3), block_out_channels=(8, 8, 16), layers_per_block=1,
                         latent_channels=2, norm_num_groups=8, use_quant_conv=False),
}


def _save_random_vae(path, config: dict, seed: int) -> TorchAutoencoderKL:
  """An AutoencoderKL with every weight perturbed, so zero inits cannot hide mistakes."""
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _relative_error(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(tmp_path, name):
  config = CONFIGS[name]
  model = _save_random_vae(tmp_path, config, seed=len(name))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, config.get("in_channels", 3), 16, 16)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (posterior.mean, posterior.logvar))
    z = rng.standard_normal(mean.shape).astype(np.float32)
    image = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  image = image.numpy().transpose(0, 2, 3, 1)

  module, params = load_diffusers(str(tmp_path))
  assert isinstance(module, AutoencoderKL)
  assert module.scaling_factor == config.get("scaling_factor", 0.18215)
  assert module.shift_factor == (config.get("shift_factor") or 0.0)
  got_mean, got_logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode)
                                 )(params, x.transpose(0, 2, 3, 1))
  got_image = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode)
                      )(params, z)

  assert got_mean.dtype == got_image.dtype == jnp.float32
  for got, want in ((got_mean, mean), (got_logvar, logvar), (got_image, image)):
    assert got.shape == want.shape and np.abs(want).max() > 0.1
    assert _relative_error(got, want) < 1e-4


def test_bfloat16_override_keeps_float32_params_and_outputs(tmp_path):
  _save_random_vae(tmp_path, CONFIGS["one_level"], seed=3)
  module, params = load_diffusers(str(tmp_path), dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  mean, logvar = jax.eval_shape(lambda p, x: module.apply({"params": p}, x, method=module.encode),
                                params, x)
  image = jax.eval_shape(lambda p, z: module.apply({"params": p}, z, method=module.decode),
                         params, mean)
  assert mean.dtype == logvar.dtype == image.dtype == jnp.float32


def test_kl_f8_preset_is_the_stable_diffusion_vae_layout():
  """The SD / DiT VAE (stabilityai/sd-vae-ft-ema config) converts onto the kl-f8 preset."""
  config = dict(_blocks(4), block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=256)
  with torch.device("meta"):  # shapes only
    model = TorchAutoencoderKL(**config)
  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
           for k, v in model.state_dict().items()}
  module, params = convert_autoencoder.convert({"_class_name": "AutoencoderKL", **config}, state)
  preset = AUTOENCODER_SIZES["kl-f8"]
  assert {k: getattr(module, k) for k in preset} == preset
  assert sum(a.size for a in jax.tree.leaves(params)) == sum(
      p.numel() for p in model.parameters()) == 83_653_863


@pytest.mark.parametrize("field, value", [
    ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
    ("up_block_types", ("UpDecoderBlock2D",)),
    ("act_fn", "gelu"),
    ("latents_mean", (0.1, 0.2, 0.3, 0.4)),
    ("norm_num_groups", 3),
    ("use_magic", True),
])
def test_unsupported_config_names_the_field(field, value):
  config = dict(CONFIGS["no_quant_no_attention"], **{field: value})
  with pytest.raises(ValueError, match=field):
    convert_autoencoder.convert(config, {})


def test_missing_or_unknown_weights_and_architecture_overrides_are_errors():
  config = CONFIGS["one_level"]
  with torch.device("meta"):
    model = TorchAutoencoderKL(**config)
  state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}
  convert_autoencoder.convert(config, state)
  with pytest.raises(ValueError, match="missing"):
    convert_autoencoder.convert(config, {k: v for k, v in state.items() if "quant_conv" not in k})
  with pytest.raises(ValueError, match="no jaxdiff counterpart"):
    convert_autoencoder.convert(config, {**state, "encoder.extra.weight": np.zeros(3)})
  with pytest.raises(ValueError, match="latent_channels"):
    convert_autoencoder.convert(config, state, latent_channels=8)


def test_deprecated_attention_names_and_conv_kernels_convert_identically():
  """Older checkpoints name the mid attention query/key/value/proj_attn (as 1x1 convs in LDM)."""
  config = CONFIGS["one_level"]
  with torch.device("meta"):
    model = TorchAutoencoderKL(**config)
  rng = np.random.default_rng(0)
  state = {k: rng.standard_normal(tuple(v.shape)).astype(np.float32)
           for k, v in model.state_dict().items()}
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in state.items():
    for new_name, old_name in renames.items():
      if f".attentions.0.{new_name}.weight" in key:
        key, value = key.replace(new_name, old_name), value[:, :, None, None]
      elif f".attentions.0.{new_name}.bias" in key:
        key = key.replace(new_name, old_name)
    old[key] = value
  assert any(k.endswith("proj_attn.weight") for k in old)
  _, params = convert_autoencoder.convert(config, state)
  _, old_params = convert_autoencoder.convert(config, old)
  jax.tree.map(np.testing.assert_array_equal, old_params, params)
