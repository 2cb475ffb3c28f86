"""A diffusers pipeline folder (`model_index.json` + one folder per part) -> its jaxdiff parts.

  DiTPipeline:              transformer/, vae/, scheduler/
  StableDiffusionPipeline:  unet/, vae/, text_encoder/, tokenizer/, scheduler/
                            (safety_checker/ and feature_extractor/ are not used)

Each model part loads through the importer of its format (`load_diffusers`,
`load_clip_text_encoder`, `jaxdiff.text.load_tokenizer`); the scheduler part is read by
`jaxdiff.convert.scheduler`. A missing part is named in one line before anything is loaded.
"""

import dataclasses
import json
import os
from typing import Any

from jaxdiff import convert
from jaxdiff import text
from jaxdiff.models.autoencoder import AutoencoderKL

INDEX_FILE = "model_index.json"
# Pipeline class -> (denoiser part, the parts it needs).
PIPELINE_PARTS = {
    "DiTPipeline": ("transformer", ("transformer", "vae", "scheduler")),
    "StableDiffusionPipeline": ("unet", ("unet", "vae", "text_encoder", "tokenizer",
                                         "scheduler")),
}
# Part -> the file that shows it is there.
_PART_FILES = {"transformer": "config.json", "unet": "config.json", "vae": "config.json",
               "text_encoder": "config.json", "tokenizer": "tokenizer_config.json",
               "scheduler": "scheduler_config.json"}


@dataclasses.dataclass(frozen=True)
class PipelineParts:
  """The loaded parts of a pipeline folder.

  Attributes:
    class_name: the pipeline's `_class_name` (a key of `PIPELINE_PARTS`).
    denoiser: (module, params): DiT (`apply(p, x, t, y)`) or UNetCond (`apply(p, x, t,
      context)`); None from `load_frozen_parts`.
    denoiser_config: the denoiser's config.json (sample_size, in_channels, ...).
    autoencoder: (AutoencoderKL, params).
    text_encoder: (CLIPTextEncoder, params), or None for a class-conditional pipeline.
    tokenizer: the prompt tokenizer, or None.
  """
  class_name: str
  denoiser: tuple[Any, Any] | None
  denoiser_config: dict
  autoencoder: tuple[Any, Any]
  text_encoder: tuple[Any, Any] | None = None
  tokenizer: text.PromptTokenizer | None = None


def is_pipeline(path: str) -> bool:
  """Whether `path` is a pipeline folder (holds model_index.json)."""
  return os.path.isfile(os.path.join(path, INDEX_FILE))


def pipeline_class(path: str) -> str:
  """The supported pipeline class of `path`, after checking that every part it needs is there.

  Raises:
    ValueError: an unsupported `_class_name`.
    FileNotFoundError: naming the first missing part, in one line.
  """
  with open(os.path.join(path, INDEX_FILE)) as f:
    index = json.load(f)
  class_name = index.get("_class_name")
  if class_name not in PIPELINE_PARTS:
    raise ValueError(f"{path}/{INDEX_FILE} _class_name={class_name!r} is not supported; jaxdiff "
                     f"samples {sorted(PIPELINE_PARTS)}")
  for part in PIPELINE_PARTS[class_name][1]:
    listed = index.get(part)
    present = os.path.isfile(os.path.join(path, part, _PART_FILES[part]))
    if not present or not listed or listed[0] is None:
      raise FileNotFoundError(
          f"{path} is a {class_name} folder without its {part}/ part ({part}/"
          f"{_PART_FILES[part]} {'missing' if not present else 'is null in ' + INDEX_FILE}); "
          f"save the whole pipeline with save_pretrained")
  return class_name


def load_pipeline(path: str, **module_overrides) -> PipelineParts:
  """Loads every model part of a DiT or Stable Diffusion pipeline folder.

  Args:
    path: the folder written by the pipeline's `save_pretrained`.
    **module_overrides: passed to every module (e.g. dtype=jnp.bfloat16).

  Raises:
    FileNotFoundError: a missing part or file, named.
    ValueError: an unsupported pipeline, part configuration or weights.
  """
  class_name = pipeline_class(path)
  denoiser_folder = os.path.join(path, PIPELINE_PARTS[class_name][0])
  denoiser = convert.load_diffusers(denoiser_folder, **module_overrides)
  with open(os.path.join(denoiser_folder, "config.json")) as f:
    config = json.load(f)
  frozen = load_frozen_parts(path, class_name, **module_overrides)
  return dataclasses.replace(frozen, denoiser=denoiser, denoiser_config=config)


def load_frozen_parts(path: str, class_name: str = "StableDiffusionPipeline",
                      **module_overrides) -> PipelineParts:
  """The parts that stay frozen when the denoiser is trained: the autoencoder and (text-to-image)
  the text encoder and tokenizer; `denoiser` is None in the result.

  Raises:
    FileNotFoundError, ValueError: as `load_pipeline`.
  """
  autoencoder = convert.load_diffusers(os.path.join(path, "vae"), **module_overrides)
  if not isinstance(autoencoder[0], AutoencoderKL):
    raise ValueError(f"{path}/vae holds a {type(autoencoder[0]).__name__}, not an AutoencoderKL")
  if class_name == "DiTPipeline":
    return PipelineParts(class_name, None, {}, autoencoder)
  text_encoder = convert.load_clip_text_encoder(os.path.join(path, "text_encoder"),
                                                **module_overrides)
  tokenizer = text.load_tokenizer(os.path.join(path, "tokenizer"))
  return PipelineParts(class_name, None, {}, autoencoder, text_encoder, tokenizer)
