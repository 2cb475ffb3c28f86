"""Validation of the ml_collections config and its conversion to frozen dataclasses.

`parse_config(config_dict)` checks everything that can be checked without devices or data and
returns a `Config`; `check_run` adds the checks that need the dataset and the device count. Both
raise `ConfigError` with one line that names the field and the fix, before anything is written.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections

from jaxdiff.data import DataConfig, DatasetInfo
from jaxdiff.diffusion import (LOSS_TYPES, OBJECTIVES, PREDICTIONS, SCHEDULE_NAMES, SPACINGS,
                               WEIGHTINGS, SamplerSettings, methods_for)
from jaxdiff.diffusion.flow import TIMESTEP_SAMPLINGS

MODEL_DTYPES = ("float32", "bfloat16")
DECAYS = ("constant", "cosine")
TASKS = ("diffusion", "autoencoder")
RECONSTRUCTION_LOSSES = ("l1", "l2")


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  class_conditional: bool
  class_dropout_prob: float
  learn_sigma: bool
  dtype: str
  overrides: Mapping[str, Any]  # size-table fields set in the config (None ones dropped)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The training objective and its options (see configs/base.py for each field's meaning)."""
  objective: str  # ddpm | flow | edm
  schedule: str
  num_timesteps: int
  prediction: str
  loss_type: str
  huber_delta: float
  weighting: str
  min_snr_gamma: float
  vlb_weight: float
  flow_timestep_sampling: str
  flow_logit_mean: float
  flow_logit_std: float
  flow_mode_scale: float
  flow_shift: float
  edm_p_mean: float
  edm_p_std: float
  edm_sigma_data: float


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """The latent diffusion run's autoencoder, or the loss of an autoencoder run (task=autoencoder).

  Defaults: checkpoints written before the section existed.
  """
  path: str = ""  # a jaxdiff autoencoder run's workdir or a diffusers AutoencoderKL folder
  loss_type: str = "l1"  # reconstruction: l1 | l2
  kl_weight: float = 1e-6  # KL(q(z|x) || N(0, I)) weight, per image element (LDM's scale)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float
  warmup_steps: int
  decay: str
  end_lr_fraction: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip_norm: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int
  batch_size: int
  steps_per_dispatch: int
  ema_decays: tuple[float, ...]
  log_every: int
  sample_every: int
  progress_bar: bool
  skip_nonfinite_updates: bool = False  # absent from checkpoints written before it existed


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int
  max_to_keep: int
  async_save: bool


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  fsdp: int
  fsdp_min_size: int
  cpu_devices: int


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  sampler: SamplerSettings  # from the section's method, num_steps, eta, spacing, clip, guidance
  num_images: int
  ema_decay: float  # resolved: always one of train.ema_decays


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  fid_every: int
  num_samples: int
  inception_weights: str
  reference_stats: str


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Text-to-image fine-tuning (see configs/base.py, section `text`); pipeline "" = off."""
  pipeline: str = ""  # StableDiffusionPipeline folder: its U-Net trains; text encoder, VAE frozen
  caption_dropout_prob: float = 0.0  # caption -> empty prompt's embedding with this probability
  init_from_pipeline: bool = True  # start from the pipeline's U-Net weights (else a fresh init)

  @property
  def enabled(self) -> bool:
    return bool(self.pipeline)


# model.name of a text-to-image run: the U-Net of text.pipeline (its layout and weights).
PIPELINE_MODEL = "pipeline"


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  task: str  # diffusion | autoencoder
  model: ModelConfig
  diffusion: DiffusionConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  sample: SampleConfig
  eval: EvalConfig
  autoencoder: AutoencoderConfig = AutoencoderConfig()
  text: TextConfig = TextConfig()  # absent from configs written before text-to-image


def _fail(field: str, value: Any, fix: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid: {fix}")


def _check(condition: bool, field: str, value: Any, fix: str) -> None:
  if not condition:
    _fail(field, value, fix)


def _section(config_dict: ml_collections.ConfigDict, cls, name: str, **resolved):
  """Builds dataclass `cls` from config section `name` (fields missing there come from `resolved`)."""
  section = config_dict[name]
  values = {}
  for field in dataclasses.fields(cls):
    if field.name in resolved:
      values[field.name] = resolved[field.name]
    elif field.name in section:
      values[field.name] = section[field.name]
    elif field.default is not dataclasses.MISSING:
      values[field.name] = field.default
    else:
      _fail(f"{name}.{field.name}", None, "missing from the config; start from configs/base.py")
  return cls(**values)


def _data_config(section: ml_collections.ConfigDict) -> DataConfig:
  values = dict(section)
  for field in ("data_dir", "folder", "latents_dir"):
    values[field] = values.get(field) or None
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(DataConfig)})
  if unknown:
    _fail(f"data.{unknown[0]}", values[unknown[0]], "not a jaxdiff.data.DataConfig field")
  try:
    return DataConfig(**values)
  except (TypeError, ValueError) as error:
    raise ConfigError(f"config.data is invalid: {error}") from None


def parse_config(config_dict: ml_collections.ConfigDict) -> Config:
  """Validates a ConfigDict (see configs/base.py) and converts it to a frozen `Config`.

  Raises:
    ConfigError: naming the first invalid field.
  """
  overrides = {k: v for k, v in config_dict.model.overrides.items() if v is not None}
  ema_decays = tuple(float(d) for d in config_dict.train.ema_decays)
  _check(len(ema_decays) > 0 and all(0.0 < d < 1.0 for d in ema_decays), "train.ema_decays",
         ema_decays, "give one or more decay rates in (0, 1), e.g. (0.9999,)")
  sample_decay = float(config_dict.sample.ema_decay) or ema_decays[0]
  autoencoder = (_section(config_dict, AutoencoderConfig, "autoencoder")
                 if "autoencoder" in config_dict else AutoencoderConfig())
  config = Config(
      seed=int(config_dict.seed),
      task=str(config_dict.get("task", "diffusion")),
      autoencoder=autoencoder,
      model=_section(config_dict, ModelConfig, "model", overrides=overrides),
      diffusion=_section(config_dict, DiffusionConfig, "diffusion"),
      data=_data_config(config_dict.data),
      optimizer=_section(config_dict, OptimizerConfig, "optimizer"),
      train=_section(config_dict, TrainConfig, "train", ema_decays=ema_decays),
      checkpoint=_section(config_dict, CheckpointConfig, "checkpoint"),
      mesh=_section(config_dict, MeshConfig, "mesh"),
      sample=_section(config_dict, SampleConfig, "sample", ema_decay=sample_decay,
                      sampler=_section(config_dict, SamplerSettings, "sample",
                                       guidance_interval=tuple(config_dict.sample.guidance_interval))),
      eval=_section(config_dict, EvalConfig, "eval"),
      text=_section(config_dict, TextConfig, "text") if "text" in config_dict else TextConfig())
  _check(config.task in TASKS, "task", config.task, f"choose one of {TASKS}")
  _check_text(config)
  _check_model(config.model, config.task)
  if config.task == "autoencoder":
    _check_autoencoder_task(config)
  _check(config.data.source != "latents" or config.task != "diffusion" or config.text.enabled
         or bool(config.autoencoder.path), "autoencoder.path", config.autoencoder.path,
         "a latent run (data.source='latents') needs the autoencoder of its latents, to decode "
         "previews and samples: a jaxdiff autoencoder run's workdir or a diffusers "
         "AutoencoderKL folder")
  _check_diffusion(config.diffusion)
  _check_objective(config)
  _check_optimizer(config.optimizer)
  _check_train(config)
  _check_sample(config)
  _check(config.eval.fid_every >= 0, "eval.fid_every", config.eval.fid_every, "use 0 (off) or more")
  if config.eval.fid_every:
    _check(bool(config.eval.reference_stats) and os.path.exists(config.eval.reference_stats),
           "eval.reference_stats", config.eval.reference_stats,
           "FID during training needs an existing .npz of reference statistics or images "
           "(python -m jaxdiff.evaluate --dataset=... writes one)")
    _check(config.eval.num_samples >= 2, "eval.num_samples", config.eval.num_samples,
           "FID needs at least 2 samples")
  return config


def _check_text(config: Config) -> None:
  """A text-to-image run: the pipeline's U-Net on cached latents and caption embeddings."""
  text, model = config.text, config.model
  _check(0.0 <= text.caption_dropout_prob < 1.0, "text.caption_dropout_prob",
         text.caption_dropout_prob, "use a probability in [0, 1) (0.1 is common)")
  if not text.enabled:
    _check(model.name != PIPELINE_MODEL, "model.name", model.name,
           "model.name='pipeline' trains the U-Net of text.pipeline; set text.pipeline to a "
           "StableDiffusionPipeline folder")
    return
  _check(config.task == "diffusion", "task", config.task,
         "text.pipeline fine-tunes a diffusion U-Net; use task='diffusion'")
  _check(os.path.isfile(os.path.join(text.pipeline, "model_index.json")), "text.pipeline",
         text.pipeline, "give a folder written by StableDiffusionPipeline.save_pretrained")
  _check(model.name == PIPELINE_MODEL, "model.name", model.name,
         "a text-to-image run trains the U-Net of text.pipeline; set model.name='pipeline'")
  for field, value in model.overrides.items():
    _check(field == "dropout", f"model.overrides.{field}", value,
           "the pipeline's U-Net fixes its layout; only model.overrides.dropout may be set")
  _check(not model.class_conditional, "model.class_conditional", True,
         "a text-to-image run is conditioned on captions; set it to False")
  _check(not model.learn_sigma, "model.learn_sigma", True,
         "Stable Diffusion's U-Net has no variance outputs; set it to False")
  _check(config.data.source == "latents", "data.source", config.data.source,
         "a text-to-image run trains on cached latents and caption embeddings: encode the "
         "caption folder with python -m jaxdiff.data.encode --pipeline=PIPELINE "
         "--source=captions --folder=DIR --output_dir=CACHE and set data.source='latents', "
         "data.latents_dir=CACHE")
  _check(config.train.sample_every == 0, "train.sample_every", config.train.sample_every,
         "text-to-image runs have no sample grids during training yet; use 0 and sample with "
         "python -m jaxdiff.sample --workdir=... --prompt=...")
  _check(config.eval.fid_every == 0, "eval.fid_every", config.eval.fid_every,
         "FID during training is not available for text-to-image runs; use 0")


def _model_table(task: str) -> dict[str, tuple[type, dict[str, Any]]]:
  """name -> (module class, size fields) of the models a task trains."""
  from jaxdiff import models  # pylint: disable=g-import-not-at-top
  if task == "autoencoder":
    return {name: (models.AutoencoderKL, fields)
            for name, fields in models.AUTOENCODER_SIZES.items()}
  return models.MODEL_SIZES


def _check_model(model: ModelConfig, task: str) -> None:
  if model.name == PIPELINE_MODEL:  # checked by _check_text
    _check(model.dtype in MODEL_DTYPES, "model.dtype", model.dtype, f"choose one of {MODEL_DTYPES}")
    return
  table = _model_table(task)
  _check(model.name in table, "model.name", model.name,
         f"task={task!r} trains one of {sorted(table)}")
  module_class = table[model.name][0]
  allowed = {f.name for f in dataclasses.fields(module_class)}
  for field, value in model.overrides.items():
    _check(field in allowed, f"model.overrides.{field}", value,
           f"{module_class.__name__} models have no such field; leave it None for {model.name!r}")
  _check(model.dtype in MODEL_DTYPES, "model.dtype", model.dtype, f"choose one of {MODEL_DTYPES}")
  _check(0.0 <= model.class_dropout_prob < 1.0, "model.class_dropout_prob",
         model.class_dropout_prob, "use a probability in [0, 1)")


def _check_autoencoder_task(config: Config) -> None:
  """What an autoencoder run needs: images, no labels, its loss options, no FID."""
  autoencoder, uses = config.autoencoder, "with task='autoencoder'"
  _check(autoencoder.loss_type in RECONSTRUCTION_LOSSES, "autoencoder.loss_type",
         autoencoder.loss_type, f"choose one of {RECONSTRUCTION_LOSSES}")
  _check(autoencoder.kl_weight >= 0, "autoencoder.kl_weight", autoencoder.kl_weight,
         "use 0 or a positive weight (LDM: 1e-6)")
  _check(config.data.source != "latents", "data.source", config.data.source,
         f"an autoencoder trains on images; choose another source {uses}")
  _check(not config.model.class_conditional, "model.class_conditional", True,
         f"use False {uses} (the autoencoder takes no labels)")
  _check(not config.model.learn_sigma, "model.learn_sigma", True, f"use False {uses}")
  _check(config.eval.fid_every == 0, "eval.fid_every", config.eval.fid_every,
         f"use 0 {uses} (previews show reconstructions)")


def _check_diffusion(diffusion: DiffusionConfig) -> None:
  _check(diffusion.schedule in SCHEDULE_NAMES, "diffusion.schedule", diffusion.schedule,
         f"choose one of {SCHEDULE_NAMES}")
  _check(diffusion.num_timesteps >= 2, "diffusion.num_timesteps", diffusion.num_timesteps,
         "use T >= 2 (1000 is standard)")
  _check(diffusion.prediction in PREDICTIONS, "diffusion.prediction", diffusion.prediction,
         f"choose one of {PREDICTIONS}")
  _check(diffusion.loss_type in LOSS_TYPES, "diffusion.loss_type", diffusion.loss_type,
         f"choose one of {LOSS_TYPES}")
  _check(diffusion.weighting in WEIGHTINGS, "diffusion.weighting", diffusion.weighting,
         f"choose one of {WEIGHTINGS}")


def _check_objective(config: Config) -> None:
  """Options of the flow and EDM objectives, and the DDPM-only options they cannot take."""
  diffusion = config.diffusion
  _check(diffusion.objective in OBJECTIVES, "diffusion.objective", diffusion.objective,
         f"choose one of {OBJECTIVES}")
  if diffusion.objective == "ddpm":
    return
  uses = f"diffusion.objective={diffusion.objective!r}"
  _check(not config.model.learn_sigma, "model.learn_sigma", True,
         f"a learned variance needs the ddpm objective; set it to False with {uses}")
  _check(diffusion.loss_type == "l2", "diffusion.loss_type", diffusion.loss_type,
         f"{uses} trains with the l2 loss; use l2")
  _check(diffusion.weighting == "none", "diffusion.weighting", diffusion.weighting,
         f"{uses} has its own weighting; use none")
  if diffusion.objective == "flow":
    _check(diffusion.flow_timestep_sampling in TIMESTEP_SAMPLINGS,
           "diffusion.flow_timestep_sampling", diffusion.flow_timestep_sampling,
           f"choose one of {TIMESTEP_SAMPLINGS}")
    _check(diffusion.flow_logit_std > 0, "diffusion.flow_logit_std", diffusion.flow_logit_std,
           "use a positive standard deviation (1.0 as SD3)")
    _check(diffusion.flow_shift > 0, "diffusion.flow_shift", diffusion.flow_shift,
           "use a positive shift (1.0 = none; SD3 uses 3.0)")
  else:
    _check(diffusion.edm_p_std > 0, "diffusion.edm_p_std", diffusion.edm_p_std,
           "use a positive standard deviation (1.2 as EDM)")
    _check(diffusion.edm_sigma_data > 0, "diffusion.edm_sigma_data", diffusion.edm_sigma_data,
           "use a positive data standard deviation (0.5 as EDM)")


def _check_optimizer(optimizer: OptimizerConfig) -> None:
  _check(optimizer.learning_rate > 0, "optimizer.learning_rate", optimizer.learning_rate,
         "use a positive learning rate")
  _check(optimizer.warmup_steps >= 0, "optimizer.warmup_steps", optimizer.warmup_steps,
         "use 0 or more steps")
  _check(optimizer.decay in DECAYS, "optimizer.decay", optimizer.decay, f"choose one of {DECAYS}")
  _check(optimizer.grad_clip_norm >= 0, "optimizer.grad_clip_norm", optimizer.grad_clip_norm,
         "use a positive norm, or 0 to disable clipping")


def _check_train(config: Config) -> None:
  train = config.train
  _check(train.num_steps >= 1, "train.num_steps", train.num_steps, "train at least one step")
  _check(train.batch_size >= 1, "train.batch_size", train.batch_size, "use a positive batch")
  k = train.steps_per_dispatch
  _check(k >= 1, "train.steps_per_dispatch", k, "use 1 or more steps per dispatch")
  for field, value in (("train.num_steps", train.num_steps), ("train.log_every", train.log_every),
                       ("train.sample_every", train.sample_every),
                       ("checkpoint.every_steps", config.checkpoint.every_steps)):
    _check(value >= 0 and value % k == 0, field, value,
           f"use a multiple of train.steps_per_dispatch={k}")
  _check(isinstance(train.skip_nonfinite_updates, bool), "train.skip_nonfinite_updates",
         train.skip_nonfinite_updates, "use True or False")
  _check(train.log_every >= 1, "train.log_every", train.log_every, "log at least every N >= 1 steps")
  _check(config.checkpoint.every_steps >= 1, "checkpoint.every_steps",
         config.checkpoint.every_steps, "save at least every N >= 1 steps")
  _check(config.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep",
         config.checkpoint.max_to_keep, "keep at least one checkpoint")
  _check(config.mesh.fsdp >= 1, "mesh.fsdp", config.mesh.fsdp, "use 1 (data parallel) or more")
  _check(config.mesh.cpu_devices >= 0, "mesh.cpu_devices", config.mesh.cpu_devices,
         "use 0 (JAX's default) or a device count")


def _check_sample(config: Config) -> None:
  sample, sampler = config.sample, config.sample.sampler
  objective = config.diffusion.objective
  methods = methods_for(objective)
  _check(sampler.method in methods, "sample.method", sampler.method,
         f"diffusion.objective={objective!r} samples with one of {methods}")
  if objective != "ddpm":
    _check_continuous_sampler(config)
  _check(sampler.spacing is None or sampler.spacing in SPACINGS, "sample.spacing",
         sampler.spacing, f"choose None (the method's default) or one of {SPACINGS}")
  _check(sampler.solver_order in (1, 2, 3), "sample.solver_order", sampler.solver_order,
         "UniPC supports orders 1, 2 and 3")
  interval = sampler.guidance_interval
  _check(not interval or (len(interval) == 2 and interval[0] <= interval[1]),
         "sample.guidance_interval", interval, "use () or (t_low, t_high) with t_low <= t_high")
  if objective == "ddpm":
    _check(1 <= sampler.num_steps <= config.diffusion.num_timesteps, "sample.num_steps",
           sampler.num_steps, f"use 1..diffusion.num_timesteps={config.diffusion.num_timesteps}")
  else:
    minimum = 2 if objective == "edm" else 1
    _check(sampler.num_steps >= minimum, "sample.num_steps", sampler.num_steps,
           f"use {minimum} or more steps")
  _check(sample.num_images >= 1, "sample.num_images", sample.num_images, "use 1 or more")
  _check(sample.ema_decay in config.train.ema_decays, "sample.ema_decay", sample.ema_decay,
         f"use 0 or one of train.ema_decays={config.train.ema_decays}")
  _check(sampler.guidance_scale >= 0, "sample.guidance_scale", sampler.guidance_scale,
         "use 1 (off: the plain conditional model) or another non-negative scale")
  if sampler.guided and not config.text.enabled:
    _check(config.model.class_conditional and config.model.class_dropout_prob > 0,
           "sample.guidance_scale", sampler.guidance_scale,
           "guidance needs model.class_conditional=True and model.class_dropout_prob > 0")


def _check_continuous_sampler(config: Config) -> None:
  """The flow and EDM samplers have no timestep grid, eta or Karras option; their own options."""
  sampler, uses = config.sample.sampler, f"with diffusion.objective={config.diffusion.objective!r}"
  _check(sampler.spacing is None, "sample.spacing", sampler.spacing, f"leave it None {uses}")
  _check(sampler.eta == 0, "sample.eta", sampler.eta, f"use 0 {uses} (DDIM only)")
  _check(not sampler.karras_sigmas, "sample.karras_sigmas", True, f"use False {uses}")
  if config.diffusion.objective == "flow":
    _check(sampler.diffusion_scale >= 0, "sample.diffusion_scale", sampler.diffusion_scale,
           "use 0 or more (1.0 as SiT)")
    return
  _check(0 < sampler.sigma_min < sampler.sigma_max, "sample.sigma_min", sampler.sigma_min,
         f"need 0 < sample.sigma_min < sample.sigma_max={sampler.sigma_max}")
  _check(sampler.rho > 0, "sample.rho", sampler.rho, "use a positive rho (7 as EDM)")
  _check(sampler.s_churn >= 0, "sample.s_churn", sampler.s_churn, "use 0 (deterministic) or more")


def model_fields(model: ModelConfig, info: DatasetInfo, task: str = "diffusion") -> dict[str, Any]:
  """Keyword arguments of `jaxdiff.models.build_model(model.name, **fields)` (task=autoencoder:
  of `build_autoencoder`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if task == "autoencoder":
    return dict(model.overrides, out_channels=info.channels, dtype=getattr(jnp, model.dtype),
                param_dtype=jnp.float32)
  return dict(model.overrides, num_classes=info.num_classes if model.class_conditional else 0,
              class_dropout_prob=model.class_dropout_prob if model.class_conditional else 0.0,
              learn_sigma=model.learn_sigma, dtype=getattr(jnp, model.dtype),
              param_dtype=jnp.float32)


def check_run(config: Config, info: DatasetInfo, num_devices: int, process_count: int) -> None:
  """Checks the config against the dataset and the devices (raises ConfigError)."""
  batch = config.train.batch_size
  _check(batch % num_devices == 0, "train.batch_size", batch,
         f"the global batch must be divisible by the device count {num_devices}")
  _check(batch % process_count == 0, "train.batch_size", batch,
         f"the global batch must be divisible by the process count {process_count}")
  _check(num_devices % config.mesh.fsdp == 0, "mesh.fsdp", config.mesh.fsdp,
         f"must divide the device count {num_devices}")
  if config.model.class_conditional:
    _check(info.num_classes > 0, "model.class_conditional", True,
           f"dataset {config.data.name or config.data.source!r} has no labels; set it to False")
  if config.text.enabled:  # the pipeline's own VAE; the U-Net's layout is checked here
    check_text_cache(config, info)
    return
  if config.data.source == "latents" and config.task == "diffusion":
    _check(os.path.isdir(config.autoencoder.path), "autoencoder.path", config.autoencoder.path,
           "no such folder; train one (configs/mnist_autoencoder.py) or give a diffusers "
           "AutoencoderKL folder")
  latents_dir = config.data.latents_dir if config.data.source == "latents" else None
  check_model_fits(config.model, info, config.task, latents_dir)


def pipeline_unet_config(pipeline: str) -> dict[str, Any]:
  """The config.json of a pipeline folder's U-Net (ConfigError naming text.pipeline if absent)."""
  path = os.path.join(pipeline, "unet", "config.json")
  _check(os.path.isfile(path), "text.pipeline", pipeline,
         "the folder lacks unet/config.json; save the whole pipeline with save_pretrained")
  with open(path) as f:
    return json.load(f)


def check_text_cache(config: Config, info: DatasetInfo) -> None:
  """Checks that the latents cache holds caption embeddings of text.pipeline fit for its U-Net."""
  from jaxdiff.data import latents  # pylint: disable=g-import-not-at-top
  cache = latents.read_latents_info(config.data.latents_dir)
  where = f"the latents in data.latents_dir={config.data.latents_dir!r}"
  encode = (f"python -m jaxdiff.data.encode --pipeline={config.text.pipeline} --source=captions "
            "--folder=DIR --output_dir=NEW_DIR")
  _check("captions" in cache, "data.latents_dir", config.data.latents_dir,
         f"{where} hold no caption embeddings; encode a caption folder with {encode}")
  encoded_with = os.path.realpath(cache.get("text_encoder") or "")
  _check(encoded_with == os.path.realpath(config.text.pipeline), "text.pipeline",
         config.text.pipeline, f"{where} were encoded with {cache.get('text_encoder')!r}; use "
         f"that pipeline or re-encode with {encode}")
  unet = pipeline_unet_config(config.text.pipeline)
  _check(unet.get("in_channels", 4) == info.channels, "data.latents_dir",
         config.data.latents_dir, f"{where} have {info.channels} channels but the U-Net takes "
         f"{unet.get('in_channels', 4)}")
  _check(unet.get("cross_attention_dim", 1280) == cache["context_shape"][-1], "data.latents_dir",
         config.data.latents_dir, f"{where} hold {cache['context_shape'][-1]}-wide text "
         f"embeddings but the U-Net cross-attends to {unet.get('cross_attention_dim', 1280)}")
  factor = 2 ** (len(unet.get("block_out_channels", (320, 640, 1280, 1280))) - 1)
  _check(info.image_size % factor == 0, "data.latents_dir", config.data.latents_dir,
         f"{where} are {info.image_size}x{info.image_size}, not divisible by the U-Net's "
         f"downsampling {factor}")


def check_model_fits(model: ModelConfig, info: DatasetInfo, task: str = "diffusion",
                     latents_dir: str | None = None) -> None:
  """Checks that the model accepts the dataset's image size (patches, U-Net and autoencoder
  downsampling); for cached latents (`latents_dir`) the size is the latents' side."""
  fields = {**_model_table(task)[model.name][1], **model.overrides}
  size = info.image_size
  field, value = ("data.latents_dir", latents_dir) if latents_dir else ("data.image_size", size)
  what = f"the latents' side {size}" if latents_dir else "the image size"
  if "patch_size" in fields:
    patch = fields["patch_size"]
    _check(size % patch == 0, field, value,
           f"{what} must be divisible by the patch size {patch} of model {model.name!r}")
  if "channel_mult" in fields or "block_out_channels" in fields:
    factor = 2 ** (len(fields.get("channel_mult") or fields["block_out_channels"]) - 1)
    _check(size % factor == 0, field, value,
           f"{what} must be divisible by {factor} (the downsampling of model {model.name!r})")


def to_dict(config_dict: ml_collections.ConfigDict) -> dict[str, Any]:
  """JSON-able dict of a ConfigDict (tuples become lists)."""
  return jsonable(config_dict.to_dict())


def jsonable(value: Any) -> Any:
  """`value` as it comes back from JSON: tuples become lists, mapping keys strings."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  return value
