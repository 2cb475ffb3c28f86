"""diffusers UNet2DConditionModel -> jaxdiff UNetCond: outputs equal diffusers (CPU torch) to 1e-4.

Tiny random models in the SD 1.x layout (8-head style: one head count for every level, 1x1 conv
projections) and the SD 2.x layout (a head count per level, linear projections), every weight
perturbed so that diffusers' zero inits cannot hide a mistake.
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from jaxdiff.convert import load_diffusers
from jaxdiff.convert import unet_cond as convert_unet_cond
from jaxdiff.models.unet_cond import UNET_COND_SIZES, UNetCond

_TWO_LEVELS = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                   layers_per_block=1, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.x: `attention_head_dim=4` means 4 heads at every level; conv proj_in / proj_out.
    "sd1_layout": dict(_TWO_LEVELS, cross_attention_dim=16, attention_head_dim=4),
    # SD 2.x: heads per level, linear projections; cross-attention at both levels, 2 transformer
    # layers per block, DDPM-style time embedding and padding, 3 output channels.
    "sd2_layout": dict(_TWO_LEVELS, cross_attention_dim=24, attention_head_dim=(2, 4),
                       use_linear_projection=True, transformer_layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D",) * 2,
                       up_block_types=("CrossAttnUpBlock2D",) * 2, out_channels=3,
                       flip_sin_to_cos=False, freq_shift=1, downsample_padding=0),
}


def _save_random_unet(path, config: dict, seed: int) -> UNet2DConditionModel:
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
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
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t = np.array([3.0, 917.25], np.float32)  # fractional: nothing may round them
  context = rng.standard_normal((2, 5, config["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    reference = model(torch.from_numpy(x), torch.from_numpy(t),
                      encoder_hidden_states=torch.from_numpy(context)).sample
  reference = reference.numpy().transpose(0, 2, 3, 1)

  module, params = load_diffusers(str(tmp_path))
  assert isinstance(module, UNetCond)
  out = jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1), t, context)

  assert out.dtype == np.float32 and out.shape == reference.shape
  assert np.abs(reference).max() > 0.1  # a real signal, not a zero-initialised output
  scale = np.abs(reference).max()
  np.testing.assert_allclose(np.asarray(out), reference, atol=1e-4 * scale, rtol=0)


@pytest.mark.slow  # builds two 860M-parameter layouts (shapes only)
@pytest.mark.parametrize("preset, config", [
    # runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 unet/config.json.
    ("unet-sd1", dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)),
    ("unet-sd2", dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                      use_linear_projection=True, sample_size=96)),
])
def test_sd_presets_are_the_diffusers_layouts(preset, config):
  """Field mapping of the real SD configs, and the parameter counts of both frameworks."""
  config = dict(config, _class_name="UNet2DConditionModel")
  fields = convert_unet_cond.unet_cond_fields(config)
  assert {k: fields[k] for k in UNET_COND_SIZES[preset]} == UNET_COND_SIZES[preset]
  with torch.device("meta"):
    model = UNet2DConditionModel(**{k: v for k, v in config.items() if k[0] != "_"})
  torch_count = sum(p.numel() for p in model.parameters())
  module = UNetCond(**fields)
  abstract = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8, 8, 4)),
                            np.zeros(1), np.zeros((1, 1, config["cross_attention_dim"])))
  assert sum(a.size for a in jax.tree.leaves(abstract)) == torch_count
  assert abs(torch_count - {"unet-sd1": 859.5e6, "unet-sd2": 865.9e6}[preset]) < 0.1e6


@pytest.mark.parametrize("field, value", [
    ("act_fn", "gelu"),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ("CrossAttnDownBlock2D", "AttnDownBlock2D")),
    ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D")),  # attention not mirrored
    ("attention_head_dim", 5),  # does not divide 32
    ("attention_head_dim", (2, 4, 8)),  # not one per level
    ("layers_per_block", (1, 2)),
    ("transformer_layers_per_block", (1, 2)),
    ("cross_attention_dim", (16, 32)),
    ("conv_in_kernel", 5),
    ("downsample_padding", 2),
])
def test_unsupported_config_names_the_field(field, value):
  config = dict(CONFIGS["sd1_layout"], **{field: value})
  with pytest.raises(ValueError, match=field):
    convert_unet_cond.convert(config, {})


def test_unknown_config_field_is_an_error():
  with pytest.raises(ValueError, match="use_magic"):
    convert_unet_cond.unet_cond_fields(dict(CONFIGS["sd1_layout"], use_magic=True))


def test_missing_or_unknown_weights_are_errors():
  config = CONFIGS["sd1_layout"]
  with torch.device("meta"):
    model = UNet2DConditionModel(**config)
  state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}
  module, params = convert_unet_cond.convert(config, state)
  assert "down_0_attn_0" in params and "up_0_attn_1" in params and "mid_attn" in params

  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  with pytest.raises(ValueError, match="missing"):
    convert_unet_cond.convert(config, {k: v for k, v in state.items() if k != key})
  with pytest.raises(ValueError, match="no jaxdiff counterpart"):
    convert_unet_cond.convert(config, {**state, "mid_block.attentions.0.extra.weight": np.zeros(3)})
  wrong = {**state, key: np.zeros((32, 17), np.float32)}
  with pytest.raises(ValueError, match="wrong shapes"):
    convert_unet_cond.convert(config, wrong)
