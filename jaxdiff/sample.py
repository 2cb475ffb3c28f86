r"""Samples images from a training run or a diffusers model folder: grid PNG, ADM-style npz, GIF.

  python -m jaxdiff.sample --workdir=runs/cifar_dit --method=ddim --num_steps=50 \
      --num_samples=50000 --batch_size=500 --seed=0
  python -m jaxdiff.sample --diffusers=path/to/ddpm-cifar10 --out=samples/ --animate
  python -m jaxdiff.sample --workdir=runs/cifar_sit --method=euler_maruyama --num_steps=250
  python -m jaxdiff.sample --workdir=runs/cifar_edm --num_steps=18 --s_churn=10
  python -m jaxdiff.sample --diffusers=path/to/DiT-XL-2-256 --labels=207,360 --guidance_scale=4
  python -m jaxdiff.sample --diffusers=path/to/stable-diffusion --prompt="a photo of a cat" \
      --negative_prompt="blurry" --guidance_scale=7.5 --method=dpmpp_2m --num_steps=25

--diffusers takes a model folder (UNet2DModel / DiTTransformer2DModel) or a whole pipeline
folder (model_index.json): a DiTPipeline (transformer/, vae/, scheduler/) samples latents and
decodes them with its autoencoder; a StableDiffusionPipeline (unet/, vae/, text_encoder/,
tokenizer/, scheduler/) does the same conditioned on --prompt or on --prompts=FILE (one prompt
per line; sample i gets prompt i % P), guided against --negative_prompt (default: empty).

A text-to-image run (configs/mnist_captions.py: a pipeline's U-Net fine-tuned on captions)
samples like its pipeline folder with the fine-tuned U-Net in it: --prompt/--prompts encoded by
the pipeline's text encoder, latents decoded by its VAE, its scheduler config's options.

Sampler and guidance flags left unset sample a training run as its previews did (its
config.sample: method, steps, spacing, eta, clipping, guidance scale, interval and rescale). A
text-to-image run whose pipeline's scheduler config matches its schedule takes that scheduler's
method, spacing and clipping instead, as its pipeline folder would, and the run's steps, eta and
guidance.

A run trained with the flow or EDM objective (config.diffusion.objective) samples with that
objective's samplers (see `jaxdiff.diffusion.methods_for`). A latent run (data.source=latents)
decodes its samples with its autoencoder (config.autoencoder.path, or --autoencoder: a jaxdiff
autoencoder run or a diffusers AutoencoderKL folder) at the scale of the latents it trained on.

Writes to --out (default WORKDIR/samples/), with TAG naming the checkpoint, sampler and seed:
  samples_TAG.npz  arr_0: uint8 [N, H, W, C]; arr_1: int labels [N] (class-conditional models);
                   text models: prompts [P], prompt_index [N], negative_prompt, prompt_source;
                   plus 0-d metadata arrays method, num_steps, eta, guidance_scale (1 = none), seed,
                   checkpoint_step (-1 for diffusers folders), use_ema, ema_decay (0 = raw
                   params), clip_denoised, spacing, source.
  grid_TAG.png     the first 64 samples.
  reverse_TAG.gif  with --animate: the reverse process of the first 16 samples.
Samples are quantised as round(clip((x + 1) * 127.5, 0, 255)) (float32, round half to even).
Bad input exits with one line on stderr (`error: ...`) and status 2 (see `jaxdiff.cli`).
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os
from typing import Any

import jax
import numpy as np

from jaxdiff import cli, convert, diffusion, images, sampling
from jaxdiff.diffusion import SamplerSettings
from jaxdiff.convert import pipeline as pipeline_lib
from jaxdiff.convert import scheduler as scheduler_lib
from jaxdiff.train import checkpoint
from jaxdiff.train import sharding as sharding_lib

METHODS = diffusion.METHODS
# Every objective's sampler names; `check_against_model` checks them against the model's objective.
ALL_METHODS = tuple(dict.fromkeys(
    method for objective in diffusion.OBJECTIVES for method in diffusion.methods_for(objective)))
SPACINGS = diffusion.SPACINGS
PREDICTIONS = diffusion.PREDICTIONS


class SampleInputError(cli.UsageError):
  """Bad user input: reported as one line on stderr."""


def _option(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """What the CLI was asked to do; each field is the flag of the same name (`jaxdiff.cli`)."""
  workdir: str | None = _option(None, "Training run to sample from (its checkpoints).")
  diffusers: str | None = _option(
      None, "A diffusers model folder (UNet2DModel / DiTTransformer2DModel) or pipeline "
      "folder (DiTPipeline / StableDiffusionPipeline) instead.")
  step: int | None = _option(None, "Checkpoint step; default: the latest.")
  schedule: str | None = _option(
      None, "--diffusers without a scheduler config only: beta schedule (default linear).")
  num_timesteps: int | None = _option(
      None, "--diffusers without a scheduler config only: T (default 1000).")
  prediction: str | None = _option(
      None, f"--diffusers without a scheduler config only: {' | '.join(PREDICTIONS)} "
      "(default eps).")
  image_size: int | None = _option(
      None, "--diffusers model folders only: image size; default: config.json sample_size.")
  channels: int | None = _option(
      None, "--diffusers only: image channels; default: config.json in_channels.")
  sampler: SamplerSettings = SamplerSettings()
  labels: tuple[int, ...] = _option(
      (), "Comma-separated class labels, cycled over the samples; empty cycles "
      "0..num_classes-1 (class-conditional models only).")
  prompt: str | None = _option(
      None, "Text-to-image pipelines and runs: the prompt of every sample.")
  prompts: str | None = _option(
      None, "Text-to-image pipelines and runs: a file of prompts, one per line; sample i gets "
      "prompt i % P.")
  negative_prompt: str | None = _option(
      None, "Text-to-image pipelines, with --guidance_scale: the unconditional prompt (default "
      "empty).")
  num_samples: int = _option(64, "Number of samples.")
  batch_size: int = _option(64, "Samples per sampler call, all devices together.")
  seed: int = _option(0, "Sample i uses fold_in(key(seed), i).")
  use_ema: bool = _option(True, "Sample with the EMA parameters.")
  ema_decay: float | None = _option(
      None, "Which EMA, when the run keeps several; default: the run's config.sample.ema_decay.")
  autoencoder: str | None = _option(
      None, "Latent runs: the autoencoder that decodes the samples (a jaxdiff autoencoder run's "
      "workdir or a diffusers AutoencoderKL folder); default: the run's config.autoencoder.path.")
  out: str | None = _option(
      None, "Output folder; default: WORKDIR/samples, or ./samples with --diffusers.")
  animate: bool = _option(False, "Also write a GIF of the reverse process.")
  animate_frames: int = _option(20, "GIF frames (states shown).")


def check_options(options: SampleOptions) -> None:
  """Checks what can be checked before loading a model; raises SampleInputError."""
  if (options.workdir is None) == (options.diffusers is None):
    raise SampleInputError("give exactly one of --workdir (a training run) and --diffusers")
  source = options.workdir or options.diffusers
  if not os.path.isdir(source):
    raise SampleInputError(f"{source} is not a directory")
  settings = options.sampler
  choices = [("method", settings.method, ALL_METHODS), ("spacing", settings.spacing, SPACINGS),
             ("prediction", options.prediction, PREDICTIONS),
             ("schedule", options.schedule, diffusion.SCHEDULE_NAMES)]
  for name, value, allowed in choices:
    if value is not None and value not in allowed:
      raise SampleInputError(f"--{name}={value!r} is unknown; choose one of {', '.join(allowed)}")
  positive = [("num_samples", options.num_samples), ("batch_size", options.batch_size),
              ("num_steps", settings.steps), ("animate_frames", options.animate_frames)]
  for name, value in positive:
    if value <= 0:
      raise SampleInputError(f"--{name}={value} must be > 0")
  if any(label < 0 for label in options.labels):
    raise SampleInputError(f"--labels={','.join(map(str, options.labels))} must be >= 0")
  if settings.eta is not None and settings.eta < 0:
    raise SampleInputError(f"--eta={settings.eta} must be >= 0")
  if settings.guidance_scale is not None and settings.guidance_scale < 0:
    raise SampleInputError(f"--guidance_scale={settings.guidance_scale} must be >= 0")
  if settings.guidance_interval and (len(settings.guidance_interval) != 2
                                     or settings.guidance_interval[0] > settings.guidance_interval[1]):
    raise SampleInputError(f"--guidance_interval={settings.guidance_interval} must be two "
                           "timesteps t_low,t_high with t_low <= t_high")
  if options.prompt is not None and options.prompts is not None:
    raise SampleInputError("give at most one of --prompt and --prompts (a file)")
  if options.prompts is not None and not os.path.isfile(options.prompts):
    raise SampleInputError(f"--prompts={options.prompts} is not a file")
  if options.autoencoder is not None and options.workdir is None:
    raise SampleInputError("--autoencoder is for latent training runs (--workdir); a diffusers "
                           "pipeline folder decodes with its own vae/")
  if options.workdir is not None and (options.schedule or options.num_timesteps
                                      or options.prediction):
    raise SampleInputError("--schedule, --num_timesteps and --prediction are for --diffusers "
                           "folders; a training run samples with its own")


def load_model(options: SampleOptions
               ) -> tuple[sampling.DiffusionModel, dict[str, Any], SampleOptions]:
  """Loads the model of a training run or a diffusers folder.

  Returns:
    (model, provenance, options): provenance holds `checkpoint_step` (-1 for a diffusers folder)
    and `ema_decay` (0.0 when sampling the raw parameters); the options come back with the
    sampler settings the user left unset (at their defaults) resolved from the model's source
    (a run's config.sample method, steps, spacing, eta, clip_denoised and guidance, as its
    previews used them; a diffusers scheduler config's method, spacing and clip_sample).
  """
  if options.diffusers is not None:
    model, defaults = load_diffusers_model(options)
    provenance = {"checkpoint_step": -1, "ema_decay": 0.0}
  else:
    model, provenance, defaults = load_checkpoint_model(options)
  field_defaults = {field.name: field.default for field in dataclasses.fields(options.sampler)}
  unset = {name: value for name, value in defaults.items()
           if getattr(options.sampler, name) == field_defaults[name]}
  return model, provenance, dataclasses.replace(
      options, sampler=dataclasses.replace(options.sampler, **unset))


def find_scheduler_config(folder: str) -> str | None:
  """The scheduler config of a diffusers model folder: its own, or its pipeline's."""
  for candidate in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                    os.path.join(folder, "scheduler_config.json"),
                    os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler",
                                 "scheduler_config.json")):
    if os.path.isfile(candidate):
      return candidate
  return None


def diffusers_scheduler(options: SampleOptions) -> tuple[diffusion.Schedule, str, dict, dict]:
  """(schedule, prediction, scheduler kwargs, setting defaults) of a diffusers folder.

  With a scheduler config (`convert.scheduler.scheduler_spec`) the schedule, the prediction type
  and the scheduler's own options (steps_offset, set_alpha_to_one, ...) come from it, and it
  supplies the method, spacing and clip_sample the user left unset; its options apply when the
  method is the scheduler's. Without one, --schedule, --num_timesteps and --prediction (default
  linear, 1000, eps).
  """
  path = find_scheduler_config(options.diffusers)
  if path is None:
    schedule = diffusion.make_schedule(options.schedule or "linear", options.num_timesteps or 1000)
    return schedule, options.prediction or "eps", {}, {"method": "ddim", "clip_denoised": False}
  try:
    spec = scheduler_lib.scheduler_spec(path)
  except ValueError as error:
    raise SampleInputError(f"{path}: {error}") from None
  if spec.kind != "diffusion":
    raise SampleInputError(f"{path}: {spec.class_name} (flow matching) is not sampled by the "
                           "sample CLI yet; use jaxdiff.diffusion.flow.sample_flow")
  for name, given, value in (("schedule", options.schedule, None),
                             ("num_timesteps", options.num_timesteps, spec.schedule.num_timesteps),
                             ("prediction", options.prediction, spec.prediction)):
    if given is not None and given != value:
      raise SampleInputError(f"--{name}={given} contradicts the scheduler config {path}; leave "
                             "it unset (the config defines it)")
  kwargs = {k: v for k, v in spec.sample_kwargs.items()
            if k not in ("method", "prediction", "spacing", "clip_denoised")}
  method = options.sampler.method or spec.method
  if method != spec.method:  # another sampler: only the schedule's own offset carries over
    kwargs = {"steps_offset": kwargs.get("steps_offset", 0)}
  defaults = {"method": spec.method,
              "clip_denoised": bool(spec.sample_kwargs.get("clip_denoised", False))}
  if method == spec.method:
    defaults["spacing"] = spec.sample_kwargs["spacing"]
  return spec.schedule, spec.prediction, kwargs, defaults


def load_diffusers_model(options: SampleOptions) -> tuple[sampling.DiffusionModel, dict]:
  """A diffusers folder through `jaxdiff.convert.load_diffusers` and its scheduler config.

  The image size and channels come from config.json (sample_size, in_channels) unless given.
  """
  if pipeline_lib.is_pipeline(options.diffusers):
    return load_pipeline_model(options)
  schedule, prediction, scheduler_kwargs, defaults = diffusers_scheduler(options)
  try:
    module, params = convert.load_diffusers(options.diffusers)
  except (ValueError, KeyError) as error:
    raise SampleInputError(f"cannot load {options.diffusers}: {error}") from None
  with open(os.path.join(options.diffusers, "config.json")) as f:
    config = json.load(f)
  size = options.image_size or config.get("sample_size")
  channels = options.channels or config.get("in_channels")
  if not size or not channels:
    raise SampleInputError(f"{options.diffusers}/config.json has no sample_size/in_channels; "
                           "pass --image_size and --channels")
  height, width = (size, size) if isinstance(size, int) else size
  model = sampling.DiffusionModel.from_module(
      module, params, schedule, prediction, (height, width, channels), scheduler_kwargs)
  return model, defaults


def read_prompts(options: SampleOptions) -> tuple[tuple[str, ...], str]:
  """(prompts, source): --prompt, or the non-empty lines of the --prompts file."""
  if options.prompts is None:
    return (options.prompt,), "--prompt"
  with open(options.prompts, encoding="utf-8") as f:
    prompts = tuple(line.strip() for line in f if line.strip())
  if not prompts:
    raise SampleInputError(f"--prompts={options.prompts} holds no prompt (one per line)")
  return prompts, os.path.abspath(options.prompts)


def load_pipeline_model(options: SampleOptions) -> tuple[sampling.DiffusionModel, dict]:
  """A DiTPipeline or StableDiffusionPipeline folder: its denoiser, autoencoder, scheduler and
  (text-to-image) the prompts encoded by its text encoder."""
  folder = options.diffusers
  try:
    class_name = pipeline_lib.pipeline_class(folder)
    text_model = class_name == "StableDiffusionPipeline"
    if text_model and options.prompt is None and options.prompts is None:
      raise SampleInputError(f"{folder} is a text-to-image pipeline; pass --prompt or --prompts")
    schedule, prediction, scheduler_kwargs, defaults = diffusers_scheduler(options)
    parts = pipeline_lib.load_pipeline(folder)
  except (ValueError, FileNotFoundError) as error:
    if isinstance(error, SampleInputError):
      raise
    raise SampleInputError(f"cannot load {folder}: {error}") from None
  (module, params), config = parts.denoiser, parts.denoiser_config
  decoder = sampling.LatentDecoder(*parts.autoencoder)
  if options.channels is not None or options.image_size is not None:
    raise SampleInputError("--image_size and --channels are fixed by a pipeline's denoiser "
                           "(its sample_size and in_channels); leave them unset")
  size = config["sample_size"]
  shape = (size, size, config["in_channels"])
  if not text_model:
    model = sampling.DiffusionModel.from_module(module, params, schedule, prediction, shape,
                                                scheduler_kwargs)
    return dataclasses.replace(model, decoder=decoder), defaults
  return sampling.DiffusionModel(module, params, schedule, prediction, shape,
                                 scheduler_kwargs=scheduler_kwargs, decoder=decoder,
                                 text=encode_option_prompts(options, parts)), defaults


def encode_option_prompts(options: SampleOptions,
                          parts: pipeline_lib.PipelineParts) -> sampling.TextConditioning:
  """--prompt / --prompts and --negative_prompt, encoded once by a pipeline's text encoder."""
  prompts, _ = read_prompts(options)
  encoder, encoder_params = parts.text_encoder
  return sampling.encode_prompts(parts.tokenizer, encoder, encoder_params, prompts,
                                 options.negative_prompt or "")


def with_pipeline(model: sampling.DiffusionModel, pipeline: str, options: SampleOptions,
                  defaults: dict) -> tuple[sampling.DiffusionModel, dict]:
  """A text-to-image run's U-Net with the frozen parts of the pipeline it was fine-tuned from.

  The VAE decodes the latents and the text encoder encodes the prompts. When the pipeline's
  scheduler config describes the run's own noise schedule and prediction, its options
  (steps_offset, set_alpha_to_one, ...) and default method, spacing and clipping replace the
  run's, so the run samples as the pipeline folder does with the fine-tuned U-Net in it; the
  run's other defaults (steps, eta, guidance) stay.

  Returns:
    (model, setting defaults), see `load_model`.
  """
  if options.prompt is None and options.prompts is None:
    raise SampleInputError(f"{options.workdir} is a text-to-image run; pass --prompt or --prompts")
  what = f"{options.workdir} was fine-tuned from {pipeline}, which"
  try:
    pipeline_lib.pipeline_class(pipeline)
    parts = pipeline_lib.load_frozen_parts(pipeline)
  except (ValueError, FileNotFoundError) as error:
    raise SampleInputError(f"{what} cannot be loaded: {error}") from None
  model = dataclasses.replace(model, decoder=sampling.LatentDecoder(*parts.autoencoder),
                              text=encode_option_prompts(options, parts))
  if model.objective != "ddpm":
    return model, defaults
  schedule, prediction, kwargs, scheduler_defaults = diffusers_scheduler(
      dataclasses.replace(options, diffusers=pipeline))
  same = (prediction == model.prediction and schedule.num_timesteps
          == model.schedule.num_timesteps and np.allclose(
              schedule.alphas_cumprod, model.schedule.alphas_cumprod, rtol=1e-6, atol=0))
  if not same:
    return model, defaults
  return dataclasses.replace(model, scheduler_kwargs=kwargs), {**defaults, **scheduler_defaults}


def load_checkpoint_model(options: SampleOptions
                          ) -> tuple[sampling.DiffusionModel, dict, dict]:
  """The raw or EMA parameters of a checkpoint of a training run: (model, provenance, setting
  defaults), see `load_model`."""
  step = options.step
  try:
    with _quiet_orbax():
      if step is None:
        with contextlib.closing(checkpoint.open_manager(options.workdir, read_only=True)) as m:
          step = m.latest_step()
      if step is None:
        raise SampleInputError(f"no checkpoint in {checkpoint.checkpoint_dir(options.workdir)}")
      config, module, params, ema_params = checkpoint.restore_for_inference(
          options.workdir, step)
      if config.task != "diffusion":
        raise SampleInputError(
            f"{options.workdir} is an autoencoder run (task={config.task!r}); it has no sampler: "
            "encode a dataset with it (python -m jaxdiff.data.encode --autoencoder=WORKDIR) and "
            "train a latent run")
      if config.text.enabled:  # decoded by its pipeline's VAE (`with_pipeline`)
        info = checkpoint.saved_dataset_info(options.workdir, step)
        decoder, latent_shape = None, (info.image_size, info.image_size, info.channels)
      else:
        decoder, latent_shape = latent_decoder(options, config, step)
  except checkpoint.CheckpointError as error:
    raise SampleInputError(str(error)) from None
  ema_decay = 0.0
  if options.use_ema:
    ema_decay = pick_ema_decay(ema_params, options.ema_decay, config.sample.ema_decay)
    params = ema_params[ema_decay]
  shape = latent_shape or (config.data.image_size, config.data.image_size, config.data.channels)
  model = sampling.DiffusionModel.from_config(module, params, config.diffusion, shape)
  model = dataclasses.replace(model, decoder=decoder)
  # Unset sampler settings: the ones the run's config chose for its previews.
  run_sampler = config.sample.sampler
  defaults = {"method": run_sampler.method, "num_steps": run_sampler.num_steps,
              "spacing": run_sampler.spacing, "eta": run_sampler.eta,
              "clip_denoised": model.objective == "ddpm" and run_sampler.clip_denoised,
              "guidance_scale": run_sampler.guidance_scale,
              "guidance_interval": run_sampler.guidance_interval,
              "guidance_rescale": run_sampler.guidance_rescale}
  if config.text.enabled:
    model, defaults = with_pipeline(model, config.text.pipeline, options, defaults)
  return model, {"checkpoint_step": step, "ema_decay": ema_decay}, defaults


def latent_decoder(options: SampleOptions, config, step: int
                   ) -> tuple[sampling.LatentDecoder | None, tuple[int, int, int] | None]:
  """(a latent run's autoencoder at the scale of its latents, the latents' shape (h, w, c)), both
  stored in the checkpoint; (None, None) for a pixel-space run."""
  if config.data.source != "latents":
    if options.autoencoder is not None:
      raise SampleInputError("--autoencoder is for latent runs; this run trained on images")
    return None, None
  path = options.autoencoder or config.autoencoder.path
  field = "--autoencoder" if options.autoencoder else "the run's config.autoencoder.path"
  if not path:
    raise SampleInputError("this latent run names no autoencoder (config.autoencoder.path); pass "
                           "--autoencoder=PATH (the one that encoded its latents)")
  with contextlib.closing(checkpoint.open_manager(options.workdir, read_only=True)) as manager:
    latents = checkpoint.read_config(manager, step).get("latents")
  if latents is None:
    raise SampleInputError(f"checkpoint step {step} of {options.workdir} predates stored latent "
                           "scales; it cannot be decoded")
  decoder = sampling.LatentDecoder(*checkpoint.load_latent_autoencoder(path, latents, field))
  return decoder, tuple(latents["latent_shape"])


@contextlib.contextmanager
def _quiet_orbax():
  """Drops Orbax's INFO and WARNING records while restoring: it logs dozens of lines per restore
  and warns that a read-only manager is read-only, which would bury the CLI's own output."""
  def keep(record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname  # restore errors are ours to report

  absl_logger = std_logging.getLogger("absl")
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def pick_ema_decay(ema_params: dict, decay: float | None, default: float) -> float:
  """`decay` if the run keeps that EMA; by default the run's `default` (else its first)."""
  if not ema_params:
    raise SampleInputError("this run keeps no EMA parameters; pass --use_ema=false")
  decays = list(ema_params)
  if decay is None:
    decay = default if default in ema_params else decays[0]
  if decay not in ema_params:
    raise SampleInputError(f"--ema_decay={decay:g} is not one of this run's EMA decays {decays}")
  return decay


def check_against_model(options: SampleOptions, model: sampling.DiffusionModel) -> None:
  """Checks method, steps, labels and guidance against the loaded model; raises
  SampleInputError."""
  methods = diffusion.methods_for(model.objective)
  if options.sampler.method is not None and options.sampler.method not in methods:
    raise SampleInputError(f"--method={options.sampler.method!r} cannot sample this "
                           f"{model.objective} model; choose one of {', '.join(methods)}")
  if model.objective == "edm" and options.sampler.steps < 2:
    raise SampleInputError(f"--num_steps={options.sampler.steps} must be >= 2 for EDM")
  if model.objective == "ddpm" and options.sampler.steps > model.schedule.num_timesteps:
    raise SampleInputError(f"--num_steps={options.sampler.steps} exceeds the model's "
                           f"{model.schedule.num_timesteps} diffusion timesteps")
  if model.text is None and (options.prompt is not None or options.prompts is not None):
    raise SampleInputError("--prompt/--prompts need a text-to-image pipeline folder "
                           "(StableDiffusionPipeline); this model is not text-conditioned")
  if options.negative_prompt is not None and not (model.text is not None
                                                  and options.sampler.guided):
    raise SampleInputError("--negative_prompt needs a text-to-image pipeline and --guidance_scale")
  if model.text is not None:
    if options.labels:
      raise SampleInputError("--labels given but the model is text-conditioned; use --prompt")
    return
  if model.num_classes == 0:
    if options.labels:
      raise SampleInputError("--labels given but the model is unconditional")
    if options.sampler.guided:
      raise SampleInputError("--guidance_scale needs a class-conditional model")
    return
  if options.sampler.guided and not model.has_null_label:
    raise SampleInputError("--guidance_scale needs a model trained with label dropout (a null "
                           "label); this one has none")
  out_of_range = [label for label in options.labels if label >= model.num_classes]
  if out_of_range:
    raise SampleInputError(
        f"--labels {out_of_range} out of range: the model has {model.num_classes} classes "
        f"(0..{model.num_classes - 1})")


def output_tag(options: SampleOptions, provenance: dict[str, Any]) -> str:
  """Names the files of one run: checkpoint, weights, sampler, guidance, seed and count."""
  settings = options.sampler
  step = provenance["checkpoint_step"]
  parts = [f"step{step}" if step >= 0 else "diffusers"]
  if options.workdir is not None:
    parts.append(f"ema{provenance['ema_decay']:g}" if provenance["ema_decay"] else "raw")
  parts.append(f"{settings.method}{settings.steps}")
  if settings.eta:
    parts.append(f"eta{settings.eta:g}")
  if settings.guided:
    parts.append(f"cfg{settings.guidance_scale:g}")
  if settings.clip_denoised:
    parts.append("clip")
  parts += [f"seed{options.seed}", f"n{options.num_samples}"]
  return "_".join(parts)


def run(options: SampleOptions) -> dict[str, str]:
  """Loads the model, samples and writes the files (on process 0).

  Returns:
    {"npz" | "png" | "gif": path} of the files written.
  """
  check_options(options)
  model, provenance, options = load_model(options)
  check_against_model(options, model)
  labels = conditioning_labels(options, model)
  mesh = sharding_lib.make_mesh()
  if jax.process_index() == 0:
    print(f"sampling {options.num_samples} images of shape {model.output_shape} on "
          f"{mesh.devices.size} devices", flush=True)
  key_data = sampling.seed_key_data(options.seed)
  sample_fn = sampling.make_sampler(sampling.make_batch_fn(model, options.sampler), mesh,
                                    batch_size=options.batch_size, progress=True)
  samples = sample_fn(model.sampling_params, labels, key_data)
  trajectory = None
  if options.animate:
    # The same indices, keys and labels as the first samples: the GIF ends on those images.
    animated = labels[:sampling.ANIMATION_IMAGES]
    animate_fn = sampling.make_sampler(
        sampling.make_batch_fn(model, options.sampler, trajectory=True), mesh,
        batch_size=len(animated))
    trajectory = animate_fn(model.sampling_params, animated, key_data)
  paths = output_paths(options, provenance, animate=options.animate)
  if jax.process_index() == 0:
    _write(paths, samples, labels if model.num_classes else None, trajectory,
           _metadata(options, provenance, model, labels), options.animate_frames)
  return paths


def conditioning_labels(options: SampleOptions, model: sampling.DiffusionModel) -> np.ndarray:
  """int32 [N]: the class label of each sample, or for a text model its prompt index i % P."""
  if model.text is not None:
    return sampling.example_labels(options.num_samples, (), len(model.text.prompts))
  return sampling.example_labels(options.num_samples, options.labels, model.num_classes)


def output_paths(options: SampleOptions, provenance: dict[str, Any], *,
                 animate: bool) -> dict[str, str]:
  """{"npz", "png"[, "gif"]: path} under --out (default WORKDIR/samples, or ./samples)."""
  tag = output_tag(options, provenance)
  out = options.out or os.path.join(options.workdir or ".", "samples")
  paths = {"npz": os.path.join(out, f"samples_{tag}.npz"),
           "png": os.path.join(out, f"grid_{tag}.png")}
  if animate:
    paths["gif"] = os.path.join(out, f"reverse_{tag}.gif")
  return paths


def _metadata(options: SampleOptions, provenance: dict[str, Any],
              model: sampling.DiffusionModel, labels: np.ndarray) -> dict[str, Any]:
  """Stored next to the samples: scalars, echoed by `python -m jaxdiff.evaluate`, and for a text
  model its prompts [P] and each sample's prompt index [N]."""
  settings = options.sampler
  text = {}
  if model.text is not None:
    text = {"prompts": np.asarray(model.text.prompts), "prompt_index": labels,
            "prompt_source": read_prompts(options)[1],
            "negative_prompt": options.negative_prompt or ""}
  return {**text,
      "method": settings.method, "num_steps": settings.steps, "eta": settings.eta or 0.0,
      "spacing": settings.spacing or diffusion.DEFAULT_SPACINGS.get(settings.method, ""),
      "guidance_scale": settings.guidance_scale if settings.guided else 1.0,
      "clip_denoised": settings.clip_denoised, "seed": options.seed,
      "checkpoint_step": provenance["checkpoint_step"],
      "use_ema": bool(provenance["ema_decay"]), "ema_decay": provenance["ema_decay"],
      "source": os.path.abspath(options.workdir or options.diffusers),
  }


def _write(paths, samples, labels, trajectory, metadata, animate_frames) -> None:
  images.save_npz(paths["npz"], samples, labels, metadata)
  images.save_png(paths["png"], images.make_grid(samples[:sampling.GRID_IMAGES]))
  if trajectory is not None:
    images.save_gif(paths["gif"], images.animation_frames(trajectory, animate_frames))
  for path in paths.values():
    print(f"wrote {path}", flush=True)


ERRORS = (SampleInputError, FileNotFoundError)


def main() -> None:
  """The program: flags from `SampleOptions`, then `run` under the `jaxdiff.cli` convention."""
  cli.main(SampleOptions, run, ERRORS)


if __name__ == "__main__":
  main()
