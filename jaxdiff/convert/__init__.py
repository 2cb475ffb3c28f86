"""Import pretrained diffusers checkpoints into jaxdiff modules (NumPy + safetensors, no torch).

`load_diffusers(path)` reads `config.json` and `diffusion_pytorch_model.safetensors` from a
diffusers model folder and dispatches on `_class_name`. `load_clip_text_encoder(path)` reads
a transformers `CLIPTextModel` folder (a Stable Diffusion pipeline's `text_encoder/`).
"""

from jaxdiff.convert import autoencoder as _autoencoder
from jaxdiff.convert import dit as _dit
from jaxdiff.convert import unet as _unet
from jaxdiff.convert import unet_cond as _unet_cond
from jaxdiff.convert.clip import load_clip_text_encoder
from jaxdiff.convert.common import read_diffusers_folder

_CONVERTERS = {
    "UNet2DModel": _unet.convert,
    "DiTTransformer2DModel": _dit.convert,
    "UNet2DConditionModel": _unet_cond.convert,
    "AutoencoderKL": _autoencoder.convert,
}


def load_diffusers(path: str, **module_overrides):
  """Loads a diffusers `UNet2DModel`, `DiTTransformer2DModel`, `UNet2DConditionModel` or
  `AutoencoderKL` folder as (module, params).

  For the backbones `module.apply({"params": params}, x_nhwc, t, y)` (for UNet2DConditionModel:
  the text context [B, S, D] in place of y) equals the diffusers model's output on the
  NCHW-transposed input, transposed back to NHWC; for the autoencoder `method=module.encode`
  gives the posterior (mean, logvar) and `method=module.decode` the image. `module_overrides`
  (e.g. dtype=jnp.bfloat16) are passed to the jaxdiff module.
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


__all__ = ["load_clip_text_encoder", "load_diffusers", "read_diffusers_folder"]
