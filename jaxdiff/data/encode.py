r"""Encodes a dataset once with a KL autoencoder into cached latents (the `latents` source).

  python -m jaxdiff.data.encode --autoencoder=PATH/vae --output_dir=latents/mnist \
      --source=mnist_offline --image_size=32 --random_flip
  python -m jaxdiff.data.encode --pipeline=PATH/stable-diffusion --output_dir=latents/photos \
      --source=captions --folder=photos --image_size=512

`--autoencoder` is a diffusers `AutoencoderKL` folder (config.json + safetensors, e.g. a DiT
pipeline's `vae/`) or the workdir of an autoencoder trained by jaxdiff (`python -m jaxdiff.train
--config=configs/mnist_autoencoder.py`; its EMA params). `--pipeline` is a Stable Diffusion
pipeline folder instead: its `vae/` encodes the images and, for an image–caption folder
(`--source=captions`), its text encoder encodes each distinct caption and the empty prompt once,
stored beside the latents (contexts.npy) for text-to-image fine-tuning. The data flags are
`DataConfig`'s fields (any source: mnist_offline, folder, captions, tfds). `--scaling_factor=auto`
stores the latents at LDM's scale 1 / std (std over all encoded latents; a jaxdiff-trained
autoencoder has no scale of its own), a number stores that scale, and the default keeps the
autoencoder's own. With --random_flip both the image and its mirror image are encoded and stored
(as fast-DiT does), so training can flip without running the encoder. The format is described
in `latents.py`; a run that stops early leaves no `latents.json`, so it is never read.
"""
import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
from array_record.python import array_record_module
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np

from jaxdiff import cli
from jaxdiff.data import latents
from jaxdiff.data.config import DataConfig
from jaxdiff.data.pipeline import dataset_info
from jaxdiff.data.pipeline import iterate_dataset
from jaxdiff.data.sources import open_source


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """The frozen text encoder whose outputs are cached beside the latents.

  Attributes:
    tokenizer: prompts [P] -> token ids [P, L] (`jaxdiff.text.PromptTokenizer`).
    module: the encoder (`CLIPTextEncoder`; its output's `context` is what the U-Net reads).
    params: its parameters.
    source: where it came from (the pipeline folder), recorded in latents.json.
  """
  tokenizer: Any
  module: Any
  params: Any
  source: str = ""


def encode_captions(source, text: TextEncoder, output_dir: str) -> dict:
  """Writes contexts.npy: float32 [U + 1, L, D] for the U captions of a caption source and the
  empty prompt; returns the latents.json entries that describe it."""
  from jaxdiff.text import encode_texts  # pylint: disable=g-import-not-at-top
  contexts = encode_texts(text.tokenizer, text.module, text.params, [*source.captions, ""])
  np.save(os.path.join(output_dir, latents.CONTEXTS_FILE), contexts.astype(np.float32))
  return {"captions": list(source.captions), "context_shape": list(contexts.shape[1:]),
          "text_encoder": text.source}


class _Statistics:
  """Per-channel mean and std of z ~ q(z | x) over the stored latents, in float64.

  Over the mixture of the posteriors, E[z] = E[mean] and E[z^2] = E[mean^2 + std^2].
  """

  def __init__(self, channels: int):
    self.count = 0
    self.first = np.zeros(channels)
    self.second = np.zeros(channels)

  def add(self, mean: np.ndarray, std: np.ndarray) -> None:
    mean, std = mean.astype(np.float64), std.astype(np.float64)
    self.count += mean[..., 0].size
    self.first += mean.reshape(-1, mean.shape[-1]).sum(0)
    self.second += (mean**2 + std**2).reshape(-1, mean.shape[-1]).sum(0)

  def summary(self) -> dict:
    channel_mean = self.first / self.count
    channel_var = self.second / self.count - channel_mean**2
    overall_var = self.second.sum() / (self.count * len(self.first)) - channel_mean.mean()**2
    return {"channel_mean": channel_mean.tolist(), "channel_std": np.sqrt(channel_var).tolist(),
            "std": float(np.sqrt(overall_var)),
            "suggested_scaling_factor": float(1.0 / np.sqrt(overall_var))}


def _make_encoder(module, params, batch_size: int):
  """Jitted [B, H, W, C] float -> (mean, std), sharded over all devices on the batch axis."""
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  data, replicated = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh,
                                                                                PartitionSpec())
  params = jax.device_put(params, replicated)

  @jax.jit
  def encode(params, images):
    mean, logvar = module.apply({"params": params}, images, method=module.encode)
    return mean, jnp.exp(0.5 * logvar)

  def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = len(images)
    padded = np.zeros((batch_size,) + images.shape[1:], np.float32)
    padded[:count] = images
    mean, std = encode(params, jax.device_put(padded, data))
    return np.asarray(mean)[:count], np.asarray(std)[:count]

  return run


def _check_fits(data_info, module, params) -> None:
  """One clear line, before anything is written, when the images cannot be encoded."""
  if data_info.num_examples == 0:
    raise ValueError("the dataset of this DataConfig has no examples")
  in_channels = params["encoder"]["conv_in"]["kernel"].shape[2]
  if data_info.channels != in_channels:
    raise ValueError(f"DataConfig.channels gives {data_info.channels}-channel images but the "
                     f"autoencoder takes {in_channels}; set --channels={in_channels}")
  factor = module.downsample_factor
  if data_info.image_size % factor:
    raise ValueError(f"DataConfig.image_size={data_info.image_size} is not divisible by the "
                     f"autoencoder's downsampling factor {factor}")


def encode_dataset(cfg: DataConfig, module, params, output_dir: str, *, batch_size: int = 64,
                   records_per_shard: int = 10_000, autoencoder: str = "",
                   scaling_factor: float | str | None = None,
                   text: TextEncoder | None = None) -> dict:
  """Encodes every example of `cfg` in dataset order and writes a latents folder.

  Args:
    cfg: the image dataset; `cfg.random_flip` stores the mirror image's latents too.
    module: a `jaxdiff.models.autoencoder.AutoencoderKL` (from `load_diffusers` or a
      jaxdiff-trained checkpoint); its scaling_factor and shift_factor are recorded.
    params: its parameters.
    output_dir: created if missing; an existing latents.json there is an error.
    batch_size: images per encoder call (rounded up to a multiple of the device count).
    records_per_shard: examples per ArrayRecord file.
    autoencoder: where the autoencoder came from, recorded in latents.json.
    scaling_factor: the scale stored with the latents: None keeps the module's, "auto" takes
      1 / std of the encoded latents (LDM's rule), a positive number is used as is.
    text: for an image–caption folder (source "captions"): the text encoder whose output for
      each distinct caption (and the empty prompt) is stored beside the latents.

  Returns:
    The written `latents.json` contents (see `latents.read_latents_info`).
  """
  if cfg.source == "latents":
    raise ValueError("DataConfig.source='latents' is already encoded; encode an image source")
  if not (scaling_factor in (None, "auto") or (isinstance(scaling_factor, (int, float))
                                                and scaling_factor > 0)):
    raise ValueError(f"--scaling_factor={scaling_factor!r} must be 'auto' or a positive number")
  if records_per_shard < 1 or batch_size < 1:
    raise ValueError(f"batch_size={batch_size} and records_per_shard={records_per_shard} must "
                     "be >= 1")
  info_path = os.path.join(output_dir, latents.INFO_FILE)
  if os.path.exists(info_path):
    raise ValueError(f"--output_dir={output_dir!r} already holds {latents.INFO_FILE}; choose a "
                     "new folder")
  if text is not None and cfg.source != "captions":
    raise ValueError(f"DataConfig.source={cfg.source!r}: text embeddings are cached for an "
                     "image–caption folder only; use --source=captions --folder=DIR")
  data_info = dataset_info(cfg)
  _check_fits(data_info, module, params)
  os.makedirs(output_dir, exist_ok=True)
  text_info = {} if text is None else encode_captions(open_source(cfg), text, output_dir)
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  encode = _make_encoder(module, params, batch_size)
  variants = 2 if cfg.random_flip else 1
  num_shards = max(1, -(-data_info.num_examples // records_per_shard))
  files = [latents.shard_name(i, num_shards) for i in range(num_shards)]
  writer, written, stats, latent_shape = None, 0, None, None
  for batch in iterate_dataset(cfg, batch_size=batch_size):
    images = batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    views = [images, images[:, :, ::-1]][:variants]
    moments = [encode(view) for view in views]  # variants x (mean, std) [B, h, w, c]
    stacked = np.stack([np.stack(m, axis=1) for m in moments], axis=1)  # [B, V, 2, h, w, c]
    if stats is None:
      latent_shape = list(stacked.shape[3:])
      stats = _Statistics(latent_shape[-1])
    stats.add(stacked[:, :, 0], stacked[:, :, 1])
    for record, label in zip(stacked, batch["label"]):
      if written % records_per_shard == 0:
        if writer is not None:
          writer.close()
        path = os.path.join(output_dir, files[written // records_per_shard])
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      writer.write(latents.pack_record(record, int(label)))
      written += 1
  if writer is not None:
    writer.close()
  summary = stats.summary()
  scale = {None: module.scaling_factor, "auto": summary["suggested_scaling_factor"]}.get(
      scaling_factor, scaling_factor)
  info = {
      "format": latents.FORMAT, "num_examples": written, "latent_shape": latent_shape,
      "variants": variants, "num_classes": data_info.num_classes,
      "scaling_factor": float(scale), "shift_factor": float(module.shift_factor),
      **summary, "files": files, "image_size": data_info.image_size,
      "image_channels": data_info.channels, "autoencoder": autoencoder,
      "data": dataclasses.asdict(cfg), **text_info,
  }
  with open(info_path + ".tmp", "w") as f:
    json.dump(info, f, indent=2)
  os.replace(info_path + ".tmp", info_path)
  return info


# Data flags are DataConfig's own fields (minus those of the latents source), so the two never
# drift apart.
_DATA_FIELDS = [f for f in dataclasses.fields(DataConfig) if not f.name.startswith("latent")]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI's flags (only when run as a program: library users import no flags)."""
  defaults = DataConfig()
  for field in _DATA_FIELDS:
    default = getattr(defaults, field.name)
    define = (flags.DEFINE_bool if isinstance(default, bool) else
              flags.DEFINE_integer if isinstance(default, int) else flags.DEFINE_string)
    define(field.name, default, f"DataConfig.{field.name}.", flag_values=flag_values)
  flags.DEFINE_string("autoencoder", None,
                      "diffusers AutoencoderKL folder (config.json + safetensors), or the workdir "
                      "of a jaxdiff autoencoder run.", flag_values=flag_values)
  flags.DEFINE_string("scaling_factor", "",
                      "Latent scale stored with the latents: '' the autoencoder's own, 'auto' "
                      "1 / std of the encoded latents (LDM), or a positive number.",
                      flag_values=flag_values)
  flags.DEFINE_string("pipeline", None,
                      "Instead of --autoencoder: a StableDiffusionPipeline folder (its vae/, and "
                      "for --source=captions its text encoder).", flag_values=flag_values)
  flags.DEFINE_string("output_dir", None, "Folder for latents.json and the shards.",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call (all devices).",
                       flag_values=flag_values)
  flags.DEFINE_integer("records_per_shard", 10_000, "Examples per ArrayRecord file.",
                       flag_values=flag_values)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Encoder compute dtype (outputs are float32).", flag_values=flag_values)


def run(flag: flags.FlagValues = flags.FLAGS) -> dict:
  """Encodes per the (parsed) flags; returns the latents.json contents."""
  from jaxdiff.train import checkpoint  # pylint: disable=g-import-not-at-top
  if (flag.autoencoder is None) == (flag.pipeline is None) or not flag.output_dir:
    raise ValueError("--output_dir=DIR and one of --autoencoder=PATH (a diffusers AutoencoderKL "
                     "folder or a jaxdiff autoencoder run) and --pipeline=PATH (a "
                     "StableDiffusionPipeline folder) are required")
  scaling_factor = _scaling_factor(flag.scaling_factor)
  cfg = DataConfig(**{f.name: getattr(flag, f.name) for f in _DATA_FIELDS})
  dtype = jnp.dtype(flag.dtype)
  if flag.pipeline is not None:
    (module, params), text = _pipeline_parts(flag.pipeline, cfg, dtype)
    autoencoder = os.path.join(os.path.abspath(flag.pipeline), "vae")
  else:
    try:
      module, params = checkpoint.load_autoencoder(flag.autoencoder, "--autoencoder")
    except checkpoint.CheckpointError as error:
      raise ValueError(str(error)) from None
    module = module.clone(dtype=dtype)
    text, autoencoder = None, os.path.abspath(flag.autoencoder)
  info = encode_dataset(cfg, module, params, flag.output_dir, batch_size=flag.batch_size,
                        records_per_shard=flag.records_per_shard, autoencoder=autoencoder,
                        scaling_factor=scaling_factor, text=text)
  print(f"wrote {info['num_examples']} x {info['variants']} latents {info['latent_shape']} to "
        f"{flag.output_dir} (channel std {np.round(info['channel_std'], 4).tolist()}, "
        f"suggested scaling_factor {info['suggested_scaling_factor']:.5f})")
  return info


def _pipeline_parts(path: str, cfg: DataConfig,
                    dtype) -> tuple[tuple[Any, Any], TextEncoder | None]:
  """(autoencoder, text encoder) of a Stable Diffusion pipeline folder; the text encoder only for
  a caption source. A missing part is named (`jaxdiff.convert.pipeline`)."""
  from jaxdiff.convert import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if not pipeline_lib.is_pipeline(path):
    raise ValueError(f"--pipeline={path!r} holds no {pipeline_lib.INDEX_FILE}: give a folder "
                     "written by StableDiffusionPipeline.save_pretrained")
  if pipeline_lib.pipeline_class(path) != "StableDiffusionPipeline":
    raise ValueError(f"--pipeline={path!r} is not a StableDiffusionPipeline folder")
  parts = pipeline_lib.load_frozen_parts(path, dtype=dtype)
  if cfg.source != "captions":
    return parts.autoencoder, None
  return parts.autoencoder, TextEncoder(parts.tokenizer, *parts.text_encoder,
                                        source=os.path.abspath(path))


def _scaling_factor(text: str) -> float | str | None:
  """The --scaling_factor flag: '' -> None (the autoencoder's own), 'auto', or a number."""
  if text in ("", "auto"):
    return text or None
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"--scaling_factor={text!r} must be empty, 'auto' or a number") from None


def main(argv):
  """Bad input: one `error:` line and exit status 2 (`jaxdiff.cli`), before anything is written."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  cli.call(lambda _: run(), None, (ValueError, OSError))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
