"""diffusers `UNet2DModel` -> `jaxdiff.models.unet.UNet` (config mapping + NumPy weight renaming).

Supported: down blocks DownBlock2D / AttnDownBlock2D, up blocks UpBlock2D / AttnUpBlock2D with
attention at the same levels on both paths, mid block UNetMidBlock2D, positional time embedding
(any flip_sin_to_cos / freq_shift), resnet_time_scale_shift "default" or "scale_shift", class
embedding from `num_class_embeds`, act_fn silu, conv down/upsampling with downsample_padding 0
(TF "same") or 1. Anything else raises ValueError naming the config field.

Layout differences handled here: PyTorch conv kernels [O, I, kh, kw] become [kh, kw, I, O], linear
weights [O, I] become [I, O], and diffusers' up_blocks[i] is level L-1-i (up blocks run coarsest
first, jaxdiff names levels by resolution).
"""

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import common
from jaxdiff.models.unet import UNet

# UNet2DModel.__init__ defaults, for hub configs written by older diffusers that omit fields.
_DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}

RESNET_NAMES = {"norm1": "norm_1", "conv1": "conv_1", "time_emb_proj": "time_proj",
                 "norm2": "norm_2", "conv2": "conv_2", "conv_shortcut": "skip_proj"}
# Older checkpoints use query/key/value/proj_attn; diffusers renames them on load, so do we.
_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "query", "to_k": "key", "to_v": "value",
                    "to_out.0": "out", "query": "query", "key": "key", "value": "value",
                    "proj_attn": "out"}


def _unsupported(field: str, value, allowed: str) -> ValueError:
  return ValueError(f"UNet2DModel config {field}={value!r} is not supported by jaxdiff's UNet; "
                    f"supported: {allowed}")


def _block_kinds(config: dict) -> list[bool]:
  """Validates the block types; returns per-level attention flags (level 0 = full size)."""
  down = [b.removeprefix("UNetRes") for b in config["down_block_types"]]
  up = [b.removeprefix("UNetRes") for b in config["up_block_types"]]
  num_levels = len(config["block_out_channels"])
  if len(down) != num_levels or len(up) != num_levels:
    raise ValueError("UNet2DModel config down_block_types, up_block_types and block_out_channels "
                     f"must have the same length; got {len(down)}, {len(up)}, {num_levels}")
  for field, blocks, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                               ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
    for block in blocks:
      if block not in kinds:
        raise _unsupported(field, config[field], f"lists of {' / '.join(kinds)}")
  down_attention = [b == "AttnDownBlock2D" for b in down]
  up_attention = [b == "AttnUpBlock2D" for b in reversed(up)]
  if down_attention != up_attention:
    raise _unsupported("up_block_types", config["up_block_types"],
                       "attention at the same levels as down_block_types (mirrored)")
  # The attention blocks honour down/upsample_type; the plain blocks always use a conv.
  for field, level_has_resample in (("downsample_type", range(num_levels - 1)),
                                    ("upsample_type", range(1, num_levels))):
    if config[field] != "conv" and any(down_attention[l] for l in level_has_resample):
      raise _unsupported(field, config[field], "'conv'")
  return down_attention


def _check_simple_fields(config: dict) -> None:
  checks = (
      ("time_embedding_type", lambda v: v == "positional", "'positional'"),
      ("act_fn", lambda v: v in ("silu", "swish"), "'silu' / 'swish'"),
      ("center_input_sample", lambda v: not v, "false"),
      ("mid_block_type", lambda v: v == "UNetMidBlock2D", "'UNetMidBlock2D'"),
      ("mid_block_scale_factor", lambda v: v == 1, "1"),
      ("downsample_padding", lambda v: v in (0, 1), "0 (pad bottom/right) or 1"),
      ("resnet_time_scale_shift", lambda v: v in ("default", "scale_shift"),
       "'default' / 'scale_shift'"),
      ("class_embed_type", lambda v: v is None, "null (a class table from num_class_embeds)"),
      ("norm_num_groups", lambda v: isinstance(v, int), "an int"),
      ("attn_norm_num_groups", lambda v: v in (None, config["norm_num_groups"]),
       "null or equal to norm_num_groups"),
  )
  for field, ok, allowed in checks:
    if not ok(config[field]):
      raise _unsupported(field, config[field], allowed)


def unet_fields(config: dict) -> dict:
  """Maps a diffusers UNet2DModel config.json dict onto `UNet` field values.

  Raises:
    ValueError: naming the config field, for every layout `UNet` cannot express.
  """
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"UNet2DModel config fields {unknown} are unknown to jaxdiff's converter")
  config = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  _check_simple_fields(config)
  attention = _block_kinds(config)
  widths = list(config["block_out_channels"])
  channels = widths[0]
  if any(w % channels for w in widths):
    raise _unsupported("block_out_channels", widths, "multiples of block_out_channels[0]")
  head_dim = config["attention_head_dim"] or 0
  attended = [w for w, a in zip(widths, attention) if a]
  attended += [widths[-1]] if config["add_attention"] else []
  if head_dim and any(w % head_dim for w in attended):
    raise _unsupported("attention_head_dim", head_dim, "a divisor of every attended width")
  scale_shift = config["resnet_time_scale_shift"] == "scale_shift"
  return dict(
      channels=channels,
      channel_mult=tuple(w // channels for w in widths),
      num_res_blocks=config["layers_per_block"],
      attention_levels=tuple(l for l, a in enumerate(attention) if a),
      attention_head_dim=head_dim,
      mid_attention=bool(config["add_attention"]),
      # diffusers' mid attention has no GroupNorm with scale_shift unless attn_norm_num_groups.
      mid_attention_norm=not scale_shift or config["attn_norm_num_groups"] is not None,
      dropout=float(config["dropout"]),
      scale_shift_norm=scale_shift,
      norm_groups=config["norm_num_groups"],
      norm_eps=float(config["norm_eps"]),
      time_embed_dim=config["time_embedding_dim"] or 0,
      flip_sin_to_cos=bool(config["flip_sin_to_cos"]),
      freq_shift=float(config["freq_shift"]),
      downsample_padding="same" if config["downsample_padding"] == 0 else "symmetric",
      out_channels=config["out_channels"],
      num_classes=config["num_class_embeds"] or 0,
      class_dropout_prob=0.0,
      learn_sigma=False,
  )


def module_path(module: str, num_levels: int,
                attention_path: Callable[[str], tuple[str, ...]]) -> tuple[str, ...]:
  """diffusers U-Net module name -> path of the Flax module holding it, or () if unknown.

  Shared by `UNet2DModel` and `UNet2DConditionModel`, which lay out their blocks the same way;
  `attention_path` maps the rest of an attention module's name (after `attentions.J.`) to its
  path inside the Flax attention module.
  """
  top = {"conv_in": "conv_in", "time_embedding.linear_1": "time_dense_1",
         "time_embedding.linear_2": "time_dense_2", "class_embedding": "class_embed",
         "conv_norm_out": "norm_out", "conv_out": "conv_out"}
  if module in top:
    return (top[module],)
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
    return ("mid_attn", *attention_path(m[1]))
  if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module):
    return (f"mid_res_{m[1]}", RESNET_NAMES.get(m[2], "?"))
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                   r"\.(\d+)\.(.+)", module)
  if not m:
    return ()
  path, index, kind, j, rest = m[1], int(m[2]), m[3], m[4], m[5]
  level = index if path == "down" else num_levels - 1 - index
  if kind == "resnets":
    return (f"{path}_{level}_res_{j}", RESNET_NAMES.get(rest, "?"))
  if kind == "attentions":
    return (f"{path}_{level}_attn_{j}", *attention_path(rest))
  if rest == "conv" and j == "0":
    return (f"{path}_{level}_{'downsample' if path == 'down' else 'upsample'}",)
  return ()


def _flax_path(key: str, num_levels: int) -> tuple[str, ...]:
  """Torch parameter name -> path of the Flax module holding it (without the leaf name)."""
  return module_path(key.rsplit(".", 1)[0], num_levels,
                     lambda rest: (_ATTENTION_NAMES.get(rest, "?"),))


def _flax_leaf(path: tuple[str, ...], key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(leaf name, array in Flax layout) of one torch tensor."""
  if path[-1] == "class_embed" and not key.endswith(".bias"):
    return "embedding", value
  return common.torch_leaf(path, key, value)


def convert_state(state: dict[str, np.ndarray], num_levels: int) -> dict:
  """Renames and transposes a UNet2DModel state dict into a nested Flax params dict (NumPy)."""
  return common.convert_named_state(state, lambda key: _flax_path(key, num_levels),
                                    "UNet2DModel", _flax_leaf)


def _check_params(module: UNet, params: dict, in_channels: int) -> None:
  """Compares names and shapes of `params` with the module's own (abstract) initialisation."""
  size = 2 ** (len(module.channel_mult) - 1)
  x = jnp.zeros((1, size, size, in_channels))
  y = jnp.zeros((1,), jnp.int32) if module.num_classes else None
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)), y))
  common.check_shapes(expected["params"], params, "converted UNet2DModel weights")


def convert(config: dict, state: dict[str, np.ndarray], **module_overrides):
  """Builds (UNet, params) from a diffusers UNet2DModel config and state dict.

  Args:
    config: the parsed config.json of the UNet2DModel folder.
    state: {torch parameter name: array} from diffusion_pytorch_model.safetensors.
    **module_overrides: UNet fields to change (dtype, param_dtype, dropout, ...). With
      learn_sigma=True the diffusers output channels are read as [prediction, variance] halves.

  Returns:
    (module, params) with `module.apply({"params": params}, x_nhwc, t, y)` equal to the
    diffusers forward on the NCHW input, transposed to NHWC.
  """
  fields = unet_fields(config)
  if module_overrides.get("learn_sigma"):
    if fields["out_channels"] % 2:
      raise ValueError(f"learn_sigma=True needs an even UNet2DModel out_channels, "
                       f"got {fields['out_channels']}")
    fields["out_channels"] //= 2
  allowed = set(UNet.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(module_overrides) - allowed)
  if unknown:
    raise ValueError(f"UNet has no field(s) {unknown}; allowed: {sorted(allowed)}")
  module = UNet(**{**fields, **module_overrides})
  params = convert_state(state, len(fields["channel_mult"]))
  _check_params(module, params, config.get("in_channels", _DIFFUSERS_DEFAULTS["in_channels"]))
  return module, jax.tree.map(lambda a: jnp.asarray(a, module.param_dtype), params)
