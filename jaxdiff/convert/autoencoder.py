"""diffusers `AutoencoderKL` -> `jaxdiff.models.autoencoder.AutoencoderKL` (NumPy only).

Supported: DownEncoderBlock2D / UpDecoderBlock2D blocks, act_fn silu, any block_out_channels,
layers_per_block, latent_channels, norm_num_groups, with or without the mid attention and the
(post-)quant convs, `scaling_factor` and `shift_factor`. `latents_mean` / `latents_std`
(per-channel normalisation that some pipelines apply) and other block types raise ValueError
naming the field. `sample_size` and `force_upcast` only steer diffusers' tiling and upcasting.

Layout differences handled here: torch kernels are transposed to Flax's, diffusers' decoder
`up_blocks[i]` is level L-1-i (jaxdiff names levels by resolution), and attention weights
stored as 1x1 convs (original LDM checkpoints) are read as dense layers.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import common
from jaxdiff.models.autoencoder import AutoencoderKL

# AutoencoderKL.__init__ defaults, for configs written by older diffusers that omit fields.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,),
    "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None,
    "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# Fields that only change how the module computes, not which parameters it has.
_RUNTIME_FIELDS = ("dtype", "param_dtype")
_RESNET_NAMES = {"norm1": "norm_1", "conv1": "conv_1", "norm2": "norm_2", "conv2": "conv_2",
                 "conv_shortcut": "skip_proj", "nin_shortcut": "skip_proj"}
_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "query", "to_k": "key", "to_v": "value",
                    "to_out.0": "out", "query": "query", "key": "key", "value": "value",
                    "proj_attn": "out"}


def _unsupported(field: str, value, allowed: str) -> ValueError:
  return ValueError(f"AutoencoderKL config {field}={value!r} is not supported by jaxdiff's "
                    f"AutoencoderKL; supported: {allowed}")


def module_fields(config: dict) -> dict:
  """Maps a diffusers AutoencoderKL config.json dict onto `AutoencoderKL` field values.

  Raises:
    ValueError: naming the config field, for every layout jaxdiff's module cannot express.
  """
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"AutoencoderKL config fields {unknown} are unknown to jaxdiff's converter")
  config = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  widths = list(config["block_out_channels"])
  for field, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
    blocks = list(config[field])
    if blocks != [block] * len(widths):
      raise _unsupported(field, config[field], f"{len(widths)} x {block!r} (one per "
                         "block_out_channels entry)")
  if config["act_fn"] not in ("silu", "swish"):
    raise _unsupported("act_fn", config["act_fn"], "'silu'")
  for field in ("latents_mean", "latents_std"):
    if config[field] is not None:
      raise _unsupported(field, config[field], "null (use scaling_factor / shift_factor)")
  groups = config["norm_num_groups"]
  if not isinstance(groups, int) or any(w % groups for w in widths):
    raise _unsupported("norm_num_groups", groups, "a divisor of every block_out_channels width")
  return dict(
      block_out_channels=tuple(widths), layers_per_block=config["layers_per_block"],
      latent_channels=config["latent_channels"], out_channels=config["out_channels"],
      norm_groups=groups, mid_attention=bool(config["mid_block_add_attention"]),
      use_quant_conv=bool(config["use_quant_conv"]),
      use_post_quant_conv=bool(config["use_post_quant_conv"]),
      scaling_factor=float(config["scaling_factor"]),
      shift_factor=float(config["shift_factor"] or 0.0))


def _flax_path(key: str, num_levels: int) -> tuple[str, ...]:
  """Torch parameter name -> path of the Flax module holding it (without the leaf name)."""
  module = key.rsplit(".", 1)[0]
  if module in ("quant_conv", "post_quant_conv"):
    return (module,)
  m = re.fullmatch(r"(encoder|decoder)\.(.+)", module)
  if not m:
    return ()
  tower, rest = m[1], m[2]
  top = {"conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
  if rest in top:
    return (tower, top[rest])
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
    return (tower, "mid_attn", _ATTENTION_NAMES.get(m[1], "?"))
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", rest):
    return (tower, f"mid_res_{m[1]}", _RESNET_NAMES.get(m[2], "?"))
  m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                   rest)
  if not m or (m[1] == "down") != (tower == "encoder"):
    return ()
  path, index, kind, j, leaf_module = m[1], int(m[2]), m[3], m[4], m[5]
  level = index if path == "down" else num_levels - 1 - index
  if kind == "resnets":
    return (tower, f"{path}_{level}_res_{j}", _RESNET_NAMES.get(leaf_module, "?"))
  if leaf_module == "conv" and j == "0":
    return (tower, f"{path}_{level}_{'downsample' if path == 'down' else 'upsample'}")
  return ()


def _flax_leaf(path: tuple[str, ...], key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(leaf name, array in Flax layout) of one torch tensor."""
  if len(path) > 1 and path[-2] == "mid_attn" and value.ndim == 4 and key.endswith(".weight"):
    value = value[:, :, 0, 0]  # LDM's attention projections are 1x1 convs
  return common.torch_leaf(path, key, value)


def convert_state(state: dict[str, np.ndarray], num_levels: int) -> dict:
  """Renames and transposes an AutoencoderKL state dict into nested Flax params (NumPy)."""
  return common.convert_named_state(state, lambda key: _flax_path(key, num_levels),
                                    "AutoencoderKL", _flax_leaf)


def convert(config: dict, state: dict[str, np.ndarray], **module_overrides):
  """Builds (AutoencoderKL, params) from a diffusers AutoencoderKL config and state dict.

  Args:
    config: the parsed config.json of the AutoencoderKL folder (e.g. a pipeline's `vae/`).
    state: {torch parameter name: array} from diffusion_pytorch_model.safetensors.
    **module_overrides: only dtype and param_dtype (the architecture is the checkpoint's).

  Returns:
    (module, params): `module.apply({"params": params}, x_nhwc, method=module.encode)` equals
    diffusers' posterior (mean, logvar) and `method=module.decode` its decoder output, NHWC.
  """
  fields = module_fields(config)
  bad = sorted(set(module_overrides) - set(_RUNTIME_FIELDS))
  if bad:
    raise ValueError(f"AutoencoderKL overrides {bad} would change the checkpoint's "
                     f"architecture; only {list(_RUNTIME_FIELDS)} may be set")
  module = AutoencoderKL(**fields, **module_overrides)
  params = convert_state(state, len(fields["block_out_channels"]))
  size = module.downsample_factor
  in_channels = config.get("in_channels", _DIFFUSERS_DEFAULTS["in_channels"])
  expected = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, in_channels))))
  common.check_shapes(expected["params"], params, "converted AutoencoderKL weights")
  return module, jax.tree.map(lambda a: jnp.asarray(a, module.param_dtype), params)


__all__ = ["convert", "convert_state", "module_fields"]
