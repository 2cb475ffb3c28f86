"""diffusers `UNet2DConditionModel` -> `jaxdiff.models.unet_cond.UNetCond` (config + NumPy weights).

Supported: the Stable Diffusion 1.x / 2.x family. Down blocks CrossAttnDownBlock2D / DownBlock2D
and up blocks CrossAttnUpBlock2D / UpBlock2D with cross-attention at the same levels on both
paths, mid block UNetMidBlock2DCrossAttn, positional time embedding (any flip_sin_to_cos /
freq_shift), `attention_head_dim` (= heads, diffusers' historical name) as an int or one entry
per level, `use_linear_projection` either way, `transformer_layers_per_block` an int,
`cross_attention_dim` an int. Anything else (class or addition embeddings, dual or
cross-only attention, other activations, ...) raises ValueError naming the config field.

Layout differences handled here: conv kernels [O, I, kh, kw] -> [kh, kw, I, O], linear weights
[O, I] -> [I, O], 1x1 `proj_in`/`proj_out` conv kernels -> Dense kernels [I, O], and
diffusers' up_blocks[i] is level L-1-i.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import common
from jaxdiff.convert import unet
from jaxdiff.models.unet_cond import UNetCond

# UNet2DConditionModel.__init__ defaults, for configs that omit fields. Each supported field
# maps to the one value (or the predicate in `_check_fields`) jaxdiff implements.
_DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "attention_head_dim": 8,
    "num_attention_heads": None, "dual_cross_attention": False, "use_linear_projection": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Fields whose value must be exactly this (their diffusers default).
_FIXED = ("center_input_sample", "only_cross_attention", "reverse_transformer_layers_per_block",
          "encoder_hid_dim", "encoder_hid_dim_type", "num_attention_heads",
          "dual_cross_attention", "class_embed_type", "addition_embed_type", "num_class_embeds",
          "resnet_time_scale_shift", "resnet_skip_time_act", "resnet_out_scale_factor",
          "time_embedding_type", "time_embedding_act_fn", "timestep_post_act",
          "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "attention_type",
          "class_embeddings_concat", "cross_attention_norm", "mid_block_type",
          "mid_block_scale_factor")

_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "out"}
_BLOCK_NAMES = {"norm1": ("norm_1",), "norm2": ("norm_2",), "norm3": ("norm_3",),
                "ff.net.0.proj": ("geglu_proj",), "ff.net.2": ("dense_out",),
                **{f"attn1.{k}": ("self_attn", v) for k, v in _ATTENTION_NAMES.items()},
                **{f"attn2.{k}": ("cross_attn", v) for k, v in _ATTENTION_NAMES.items()}}


def _unsupported(field: str, value, allowed: str) -> ValueError:
  return ValueError(f"UNet2DConditionModel config {field}={value!r} is not supported by "
                    f"jaxdiff's UNetCond; supported: {allowed}")


def _per_level(config: dict, field: str, num_levels: int) -> list:
  value = config[field]
  values = list(value) if isinstance(value, (list, tuple)) else [value] * num_levels
  if len(values) != num_levels:
    raise _unsupported(field, value, f"an int or {num_levels} values (one per level)")
  return values


def _check_fields(config: dict) -> None:
  for field in _FIXED:
    if config[field] != _DIFFUSERS_DEFAULTS[field]:
      raise _unsupported(field, config[field], repr(_DIFFUSERS_DEFAULTS[field]))
  if config["act_fn"] not in ("silu", "swish"):
    raise _unsupported("act_fn", config["act_fn"], "'silu' / 'swish'")
  if config["downsample_padding"] not in (0, 1):
    raise _unsupported("downsample_padding", config["downsample_padding"], "0 or 1")
  if config["mid_block_only_cross_attention"]:
    raise _unsupported("mid_block_only_cross_attention",
                       config["mid_block_only_cross_attention"], "null / false")
  for field in ("transformer_layers_per_block", "cross_attention_dim"):
    if not isinstance(config[field], int):
      raise _unsupported(field, config[field], "an int (the same at every level)")
  if config["addition_time_embed_dim"] is not None:
    raise _unsupported("addition_time_embed_dim", config["addition_time_embed_dim"], "null")


def _cross_attention_levels(config: dict, num_levels: int) -> tuple[int, ...]:
  down, up = config["down_block_types"], config["up_block_types"]
  if len(down) != num_levels or len(up) != num_levels:
    raise ValueError("UNet2DConditionModel config down_block_types, up_block_types and "
                     f"block_out_channels must have the same length; got {len(down)}, "
                     f"{len(up)}, {num_levels}")
  for field, blocks, kinds in (
      ("down_block_types", down, ("CrossAttnDownBlock2D", "DownBlock2D")),
      ("up_block_types", up, ("CrossAttnUpBlock2D", "UpBlock2D"))):
    if any(b not in kinds for b in blocks):
      raise _unsupported(field, blocks, f"lists of {' / '.join(kinds)}")
  down_attention = [b.startswith("CrossAttn") for b in down]
  if down_attention != [b.startswith("CrossAttn") for b in reversed(up)]:
    raise _unsupported("up_block_types", up,
                       "cross-attention at the same levels as down_block_types (mirrored)")
  return tuple(level for level, a in enumerate(down_attention) if a)


def unet_cond_fields(config: dict) -> dict:
  """Maps a diffusers UNet2DConditionModel config.json dict onto `UNetCond` field values.

  Raises:
    ValueError: naming the config field, for every layout `UNetCond` cannot express.
  """
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(
        f"UNet2DConditionModel config fields {unknown} are unknown to jaxdiff's converter")
  config = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  _check_fields(config)
  widths = tuple(config["block_out_channels"])
  layers = _per_level(config, "layers_per_block", len(widths))
  if len(set(layers)) != 1:
    raise _unsupported("layers_per_block", config["layers_per_block"], "the same at every level")
  heads = _per_level(config, "attention_head_dim", len(widths))
  if any(not isinstance(h, int) or h < 1 or w % h for h, w in zip(heads, widths)):
    raise _unsupported("attention_head_dim", config["attention_head_dim"],
                       "head counts (diffusers' historical name) dividing each level's width")
  if not isinstance(config["norm_num_groups"], int):
    raise _unsupported("norm_num_groups", config["norm_num_groups"], "an int")
  return dict(
      widths=widths,
      layers_per_block=layers[0],
      cross_attention_levels=_cross_attention_levels(config, len(widths)),
      num_heads=tuple(heads),
      transformer_layers=config["transformer_layers_per_block"],
      dropout=float(config["dropout"]),
      norm_groups=config["norm_num_groups"],
      norm_eps=float(config["norm_eps"]),
      time_embed_dim=config["time_embedding_dim"] or 0,
      flip_sin_to_cos=bool(config["flip_sin_to_cos"]),
      freq_shift=float(config["freq_shift"]),
      downsample_padding="same" if config["downsample_padding"] == 0 else "symmetric",
      out_channels=config["out_channels"],
  )


def _transformer_path(module: str) -> tuple[str, ...]:
  """Transformer2DModel-relative torch module name -> SpatialTransformer-relative path."""
  if module in ("norm", "proj_in", "proj_out"):
    return (module,)
  if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
    return (f"block_{m[1]}", *_BLOCK_NAMES.get(m[2], ("?",)))
  return ("?",)


def _flax_leaf(path: tuple[str, ...], key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(leaf name, array in Flax layout); proj_in / proj_out 1x1 convs become Dense kernels."""
  leaf, value = common.torch_leaf(path, key, value)
  if leaf == "kernel" and path[-1] in ("proj_in", "proj_out") and value.ndim == 4:
    value = value[0, 0]
  return leaf, value


def _flax_path_of_parameter(key: str, num_levels: int) -> tuple[str, ...]:
  module, kind = key.rsplit(".", 1)
  if kind not in ("weight", "bias"):
    return ()
  return unet.module_path(module, num_levels, _transformer_path)


def convert_state(state: dict[str, np.ndarray], num_levels: int) -> dict:
  """Renames and transposes a UNet2DConditionModel state dict into nested Flax params."""
  return common.convert_named_state(
      state, lambda key: _flax_path_of_parameter(key, num_levels), "UNet2DConditionModel",
      _flax_leaf)


def convert(config: dict, state: dict[str, np.ndarray], **module_overrides):
  """Builds (UNetCond, params) from a diffusers UNet2DConditionModel config and state dict.

  Args:
    config: the parsed config.json of the UNet2DConditionModel folder.
    state: {torch parameter name: array} from diffusion_pytorch_model.safetensors.
    **module_overrides: UNetCond fields to change (dtype, param_dtype, dropout, ...).

  Returns:
    (module, params) with `module.apply({"params": params}, x_nhwc, t, context)` equal to the
    diffusers forward `(x_nchw, t, encoder_hidden_states=context).sample`, transposed to NHWC.
  """
  fields = unet_cond_fields(config)
  allowed = set(UNetCond.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(module_overrides) - allowed)
  if unknown:
    raise ValueError(f"UNetCond has no field(s) {unknown}; allowed: {sorted(allowed)}")
  module = UNetCond(**{**fields, **module_overrides})
  params = convert_state(state, len(fields["widths"]))
  size = 2 ** (len(module.widths) - 1)
  x = jnp.zeros((1, size, size, config.get("in_channels", _DIFFUSERS_DEFAULTS["in_channels"])))
  context_dim = config.get("cross_attention_dim", _DIFFUSERS_DEFAULTS["cross_attention_dim"])
  expected = jax.eval_shape(lambda: module.init(
      jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, 1, context_dim))))
  common.check_shapes(expected["params"], params, "converted UNet2DConditionModel weights")
  return module, jax.tree.map(lambda a: jnp.asarray(a, module.param_dtype), params)


__all__ = ["convert", "convert_state", "unet_cond_fields"]
