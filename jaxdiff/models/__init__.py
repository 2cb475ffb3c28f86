"""Backbones (U-Net, DiT), the latent autoencoder, and the size tables that name them.

`build_model("dit-s/2", num_classes=10)` returns a Flax module; every model is called as
`model.apply({"params": p}, x, t, y, train=False)` with x [B, H, W, C], t [B], y [B] int or None.
`build_autoencoder("kl-f8")` returns the KL autoencoder of latent diffusion (`encode` / `decode`).

Text-to-image (Stable Diffusion layout): `UNetCond` is called as
`model.apply({"params": p}, x, t, context, train=False)` with context [B, S, D] from
`CLIPTextEncoder`; their named layouts are `UNET_COND_SIZES` and `CLIP_TEXT_SIZES`.
"""

import dataclasses

from jaxdiff.models.autoencoder import AUTOENCODER_SIZES, AutoencoderKL, build_autoencoder
from jaxdiff.models.autoencoder import decode_in_chunks
from jaxdiff.models.clip import CLIP_TEXT_SIZES, CLIPTextEncoder, CLIPTextOutput
from jaxdiff.models.dit import DiT, DIT_SIZES
from jaxdiff.models.unet import UNet, UNET_SIZES
from jaxdiff.models.unet_cond import UNET_COND_SIZES, UNetCond

# name -> (module class, field values). Explicit dict, no registration by import side effect.
MODEL_SIZES = {
    **{name: (DiT, fields) for name, fields in DIT_SIZES.items()},
    **{name: (UNet, fields) for name, fields in UNET_SIZES.items()},
}


def build_model(name: str, **overrides):
  """Builds the backbone `name` from the size table, with field overrides (e.g. num_classes=10)."""
  if name not in MODEL_SIZES:
    raise ValueError(f"model.name={name!r} is unknown; choose one of {sorted(MODEL_SIZES)}")
  module_class, fields = MODEL_SIZES[name]
  allowed = {f.name for f in dataclasses.fields(module_class)} - {"parent", "name"}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(
        f"model field(s) {unknown} do not exist for {name!r} ({module_class.__name__}); "
        f"allowed: {sorted(allowed)}")
  return module_class(**{**fields, **overrides})


__all__ = ["AUTOENCODER_SIZES", "AutoencoderKL", "CLIPTextEncoder", "CLIPTextOutput",
           "CLIP_TEXT_SIZES", "DiT", "MODEL_SIZES", "UNET_COND_SIZES", "UNet", "UNetCond",
           "build_autoencoder", "build_model", "decode_in_chunks"]
