"""diffusers UNet2DModel -> jaxdiff UNet: outputs equal diffusers (CPU torch) to < 1e-4."""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from jaxdiff.convert import load_diffusers
from jaxdiff.convert import unet as convert_unet
from jaxdiff.models.unet import UNET_SIZES, UNet

# google/ddpm-cifar10-32's config.json (the DDPM CIFAR-10 network converted by diffusers).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

_TWO_LEVELS = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                   norm_num_groups=8)
CONFIGS = {
    # diffusers' own conventions: [cos, sin], freq_shift 0, symmetric padding, 8-dim heads;
    # no mid attention.
    "diffusers_conventions": dict(_TWO_LEVELS, add_attention=False,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # DDPM's conventions on three levels, attention in the middle only, single-head attention.
    "ddpm_style": dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2,
                       norm_num_groups=8, attention_head_dim=None, downsample_padding=0,
                       flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # ADM-like: scale-shift norm (mid attention without GroupNorm), classes, 1 -> 2 channels.
    "scale_shift_classes": dict(_TWO_LEVELS, in_channels=1, out_channels=2,
                                resnet_time_scale_shift="scale_shift", num_class_embeds=5,
                                time_embedding_dim=48, attention_head_dim=16,
                                down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D")),
    # Scale-shift with attn_norm_num_groups set: the mid attention keeps its GroupNorm; attention
    # only in the mid block; 4 channels.
    "scale_shift_mid_norm": dict(_TWO_LEVELS, in_channels=4, out_channels=4,
                                 resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")),
}


def _save_random_unet(path, config: dict, seed: int) -> UNet2DModel:
  """A UNet2DModel whose every weight is perturbed (diffusers' zero inits would hide mistakes)."""
  torch.manual_seed(seed)
  model = UNet2DModel(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(tmp_path, name):
  config = CONFIGS[name]
  model = _save_random_unet(tmp_path, config, seed=0)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, config.get("in_channels", 3), 8, 8)).astype(np.float32)
  # Fractional timesteps check that nothing rounds them; the class labels hit distinct rows.
  t = np.array([3.0, 917.25], np.float32)
  y = np.array([4, 1]) if "num_class_embeds" in config else None
  with torch.no_grad():
    labels = None if y is None else torch.from_numpy(y)
    reference = model(torch.from_numpy(x), torch.from_numpy(t), class_labels=labels).sample
  reference = reference.numpy().transpose(0, 2, 3, 1)

  module, params = load_diffusers(str(tmp_path))
  out = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, y)

  assert out.dtype == np.float32
  assert np.abs(reference).max() > 0.1  # a real signal, not a zero-initialised output
  np.testing.assert_allclose(np.asarray(out), reference, atol=1e-4, rtol=0)


def test_learn_sigma_override_splits_output_channels(tmp_path):
  config = CONFIGS["scale_shift_classes"]  # out_channels=2: [prediction, variance] halves
  _save_random_unet(tmp_path, config, seed=1)
  _, params = load_diffusers(str(tmp_path))
  sigma_module, sigma_params = load_diffusers(str(tmp_path), learn_sigma=True)
  assert (sigma_module.out_channels, sigma_module.learn_sigma) == (1, True)
  jax.tree.map(np.testing.assert_array_equal, sigma_params, params)
  out = jax.eval_shape(sigma_module.apply, {"params": sigma_params},
                       np.zeros((1, 8, 8, 1), np.float32), np.zeros(1), np.zeros(1, np.int32))
  assert out.shape == (1, 8, 8, 2)


def test_ddpm_cifar10_preset_is_the_diffusers_layout():
  """The preset, converted with the real google/ddpm-cifar10-32 config: same fields, 35.7M."""
  with torch.device("meta"):  # shapes only: no 143 MB of torch weights
    model = UNet2DModel(**{k: v for k, v in DDPM_CIFAR10_CONFIG.items() if k[0] != "_"})
  torch_count = sum(p.numel() for p in model.parameters())

  preset = UNET_SIZES["unet-ddpm-cifar10"]
  fields = convert_unet.unet_fields(DDPM_CIFAR10_CONFIG)
  # DDPM trained with dropout 0.1; the inference config does not record it.
  assert {k: fields[k] for k in preset if k != "dropout"} == {
      k: v for k, v in preset.items() if k != "dropout"}

  state = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
           for k, v in model.state_dict().items()}
  module, params = convert_unet.convert(DDPM_CIFAR10_CONFIG, state)  # checks names and shapes
  assert sum(a.size for a in jax.tree.leaves(params)) == torch_count
  assert abs(torch_count - 35.7e6) < 0.1e6
  assert module.channel_mult == (1, 2, 2, 2) and module.attention_levels == (1,)


@pytest.mark.parametrize("field, value", [
    ("time_embedding_type", "fourier"),
    ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "ada_group"),
    ("class_embed_type", "timestep"),
    ("down_block_types", ("ResnetDownsampleBlock2D", "AttnDownBlock2D")),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")),  # attention not mirrored
    ("mid_block_type", None),
    ("downsample_padding", 2),
    ("attention_head_dim", 12),
    ("block_out_channels", (16, 24)),
    ("center_input_sample", True),
])
def test_unsupported_config_names_the_field(field, value):
  config = dict(CONFIGS["diffusers_conventions"], **{field: value})
  with pytest.raises(ValueError, match=field):
    convert_unet.convert(config, {})


def test_unknown_config_field_is_an_error():
  with pytest.raises(ValueError, match="use_magic"):
    convert_unet.unet_fields(dict(CONFIGS["diffusers_conventions"], use_magic=True))


def test_missing_or_unknown_weights_are_errors():
  config = CONFIGS["diffusers_conventions"]
  with torch.device("meta"):
    model = UNet2DModel(**config)
  state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}
  module, params = convert_unet.convert(config, state)
  assert isinstance(module, UNet) and "down_1_attn_0" in params

  missing = {k: v for k, v in state.items() if k != "down_blocks.1.attentions.0.to_q.weight"}
  with pytest.raises(ValueError, match="missing"):
    convert_unet.convert(config, missing)
  with pytest.raises(ValueError, match="no jaxdiff counterpart"):
    convert_unet.convert(config, {**state, "down_blocks.0.extra.weight": np.zeros(3)})
  wrong = {**state, "conv_in.weight": np.zeros((16, 3, 5, 5), np.float32)}
  with pytest.raises(ValueError, match="wrong shapes"):
    convert_unet.convert(config, wrong)
