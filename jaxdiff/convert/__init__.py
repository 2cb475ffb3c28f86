"""Import pretrained diffusers checkpoints into jaxdiff modules (NumPy + safetensors, no torch).

`load_diffusers(path)` reads `config.json` and `diffusion_pytorch_model.safetensors` from a
diffusers model folder and dispatches on `_class_name`.
"""

import json
import os

import numpy as np
from safetensors.numpy import load_file

from jaxdiff.convert import dit as _dit
from jaxdiff.convert import unet as _unet

_CONVERTERS = {
    "UNet2DModel": _unet.convert,
    "DiTTransformer2DModel": _dit.convert,
}


def read_diffusers_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (config dict, {torch parameter name: float32 array}) of a diffusers model folder."""
  config_path = os.path.join(path, "config.json")
  weights_path = os.path.join(path, "diffusion_pytorch_model.safetensors")
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise FileNotFoundError(
          f"{p} not found: load_diffusers needs a diffusers model folder "
          "(config.json + diffusion_pytorch_model.safetensors, from save_pretrained)")
  with open(config_path) as f:
    config = json.load(f)
  state = {k: np.asarray(v, np.float32) for k, v in load_file(weights_path).items()}
  return config, state


def load_diffusers(path: str, **module_overrides):
  """Loads a diffusers `UNet2DModel` or `DiTTransformer2DModel` folder as (module, params).

  `module.apply({"params": params}, x_nhwc, t, y)` equals the diffusers model's output on the
  NCHW-transposed input, transposed back to NHWC. `module_overrides` (e.g. dtype=jnp.bfloat16)
  are passed to the jaxdiff module.
  """
  config, state = read_diffusers_folder(path)
  class_name = config.get("_class_name")
  # Published DiT checkpoints (facebook/DiT-XL-2-256) predate DiTTransformer2DModel and name the
  # generic class; diffusers itself remaps them the same way.
  if class_name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero":
    class_name = "DiTTransformer2DModel"
  if class_name not in _CONVERTERS:
    raise ValueError(
        f"config.json _class_name={class_name!r} is not supported; "
        f"load_diffusers reads {sorted(_CONVERTERS)}")
  return _CONVERTERS[class_name](config, state, **module_overrides)


__all__ = ["load_diffusers", "read_diffusers_folder"]
