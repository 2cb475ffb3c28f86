"""From a config to everything a run needs: the one public builder.

`build_run(config_dict)` validates the config against the data and the devices and returns a
`Run`: the model, the noise schedule, the optimizer, the mesh, the abstract train state with its
shardings, and the functions that make the state, the jitted train step and the EMA sampler.
`config.task` picks what is trained: a denoiser, or (task=autoencoder) a KL autoencoder by the
same step, state, sharding and checkpoints. A latent run (data.source=latents) also loads the
autoencoder of `config.autoencoder.path`, to decode its previews; the step never runs it.
`python -m jaxdiff.train`, the benchmarks in experiments/ and the tests all start here, so they
run the same step.

Keys: the run's root key is `key(config.seed)`; each use folds in its own stream constant.
"""

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdiff import sampling
from jaxdiff.config import Config, check_run, parse_config
from jaxdiff.data import DatasetInfo, dataset_info
from jaxdiff.data import latents as latents_lib
from jaxdiff.diffusion import Schedule, make_schedule
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

# fold_in constants of the run's root key: one stream per use.
INIT_STREAM, TRAIN_STREAM, PREVIEW_STREAM, FID_STREAM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything derived from the config before training starts (no arrays allocated).

  Attributes:
    config_dict: the ConfigDict the run was built from (stored with each checkpoint).
    config: its parsed, validated form.
    info: the dataset's description (image size, channels, classes).
    mesh: the ("data", "fsdp") device mesh.
    model: the Flax backbone (task=autoencoder: the AutoencoderKL being trained).
    schedule: the noise schedule of `config.diffusion`.
    tx: the optimizer.
    lr_schedule: learning rate per step (logged).
    abstract_state: TrainState of ShapeDtypeStructs carrying their shardings.
    shardings: TrainState of NamedShardings.
    decoder: a latent run's autoencoder, at the scale of its cached latents; else None.
    null_context: a text-to-image run's empty-prompt embedding float32 [L, D] (what caption
      dropout substitutes, read from the latents cache), else None.
  """
  config_dict: ml_collections.ConfigDict
  config: Config
  info: DatasetInfo
  mesh: Mesh
  model: nn.Module
  schedule: Schedule
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  decoder: sampling.LatentDecoder | None = None
  null_context: np.ndarray | None = None


def build_run(config_dict: ml_collections.ConfigDict, *, info: DatasetInfo | None = None,
              devices: Sequence[jax.Device] | None = None) -> Run:
  """Validates the config against the data and devices and builds the run.

  Args:
    config_dict: a ConfigDict of configs/base.py (with overrides applied).
    info: the dataset's description; None reads it from the configured dataset (benchmarks pass
      a synthetic one so that no data has to be on disk).
    devices: devices of the mesh (default: all).

  Raises:
    ConfigError, DatasetNotFoundError, CheckpointError (an unusable autoencoder): with a
      one-line message, before any file is written.
  """
  config = parse_config(config_dict)
  info = dataset_info(config.data) if info is None else info
  devices = list(jax.devices() if devices is None else devices)
  check_run(config, info, len(devices), jax.process_count())
  decoder = None
  if config.data.source == "latents" and config.task == "diffusion" and not config.text.enabled:
    # (a text-to-image run decodes with its pipeline's VAE, at sampling time)
    decoder = sampling.LatentDecoder(*checkpoint_lib.load_latent_autoencoder(
        config.autoencoder.path, latents_lib.read_latents_info(config.data.latents_dir)))
  mesh = sharding_lib.make_mesh(config.mesh.fsdp, devices)
  model = state_lib.make_model(config, info)
  tx, lr_schedule = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
  shapes = state_lib.abstract_state(model, tx, config, info)
  shardings = sharding_lib.state_shardings(mesh, shapes, config.mesh.fsdp_min_size)
  return Run(config_dict=config_dict, config=config, info=info, mesh=mesh, model=model,
             schedule=make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps),
             tx=tx, lr_schedule=lr_schedule,
             abstract_state=sharding_lib.with_shardings(shapes, shardings), shardings=shardings,
             decoder=decoder, null_context=_null_context(config))


def _null_context(config: Config) -> np.ndarray | None:
  """The empty prompt's embedding stored with a text-to-image run's cached caption embeddings."""
  if not config.text.enabled:
    return None
  directory = config.data.latents_dir
  info = latents_lib.read_latents_info(directory)
  return np.array(latents_lib.read_contexts(directory, info)[-1])


def root_key(seed: int, stream: int, mesh: Mesh) -> jax.Array:
  """fold_in(key(seed), stream), replicated on the mesh (same value on every process)."""
  return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), stream),
                 out_shardings=sharding_lib.replicated(mesh))()


def init_state(run: Run) -> state_lib.TrainState:
  """Fresh state created directly with its shardings (never materialised on one device)."""
  config = run.config
  key = lambda: jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM)
  if config.text.enabled and config.text.init_from_pipeline:
    # Fine-tuning: the pipeline's weights, passed as an argument (not baked into the program).
    create = lambda params: state_lib.create_state(lambda _: params, run.tx,
                                                   config.train.ema_decays, key())
    return _run_once(create, run, state_lib.pipeline_params(config))
  init = state_lib.init_params_fn(run.model, run.info.image_size, run.info.channels,
                                  config.model.class_conditional, state_lib.context_dim(config))
  create = lambda: state_lib.create_state(init, run.tx, config.train.ema_decays, key())
  return _run_once(create, run)


# XLA:CPU options for a program that runs once: LLVM's optimisations of its loops would take
# longer than they save. The offline default's init compiles in 4-6 s instead of 14-15 s (2-core
# Xeon); the values agree to a few float32 ulps (bitwise for the offline default; see
# tests/test_builder.py).
_RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}


def _run_once(fn: Callable[..., state_lib.TrainState], run: Run, *args) -> state_lib.TrainState:
  """jit(fn, out_shardings=run.shardings)(*args), compiled for speed of compilation on CPU."""
  lowered = jax.jit(fn, out_shardings=run.shardings).lower(*args)
  on_cpu = run.mesh.devices.flat[0].platform == "cpu"
  return lowered.compile(compiler_options=_RUN_ONCE_CPU_OPTIONS if on_cpu else None)(*args)


def make_step_fn(run: Run) -> Callable[..., tuple[state_lib.TrainState, dict]]:
  """The jitted k-step function of this run: fn(state, batches [k, B, ...], key) -> (state,
  metrics [k]); the state is donated (see `jaxdiff.train.step.jit_train_step`)."""
  config = run.config
  return step_lib.jit_train_step(
      run.mesh, run.shardings, apply_fn=run.model.apply, tx=run.tx,
      lr_schedule=run.lr_schedule, schedule=run.schedule, diffusion=config.diffusion,
      conditional=config.model.class_conditional, learn_sigma=config.model.learn_sigma,
      ema_decays=config.train.ema_decays, skip_nonfinite=config.train.skip_nonfinite_updates,
      autoencoder=config.autoencoder if config.task == "autoencoder" else None,
      caption_dropout_prob=config.text.caption_dropout_prob, null_context=run.null_context)


def make_ema_sampler(run: Run, stream: int, batch_size: int) -> Callable[..., np.ndarray]:
  """Samples from the EMA params picked by `config.sample` with `config.sample.sampler`.

  The sampler is `jaxdiff.sampling.make_sampler`, the one `python -m jaxdiff.sample` uses, over
  the run's mesh with the params in their training shardings. Image i (a global index) has its
  own noise from fold_in(fold_in(key(seed), stream), i) and its label `i % num_classes`. A
  latent run's samples are decoded by `run.decoder` (replicated on the mesh).

  Returns:
    fn(state, num_images, first_index=0) -> uint8 [num_images, H, W, C].
  """
  config = run.config
  ema = state_lib.ema_key(config.sample.ema_decay)
  model = sampling.DiffusionModel.from_config(
      run.model, run.shardings.ema_params[ema], config.diffusion,
      (run.info.image_size, run.info.image_size, run.info.channels))
  if run.decoder is not None:
    replicated = sharding_lib.replicated(run.mesh)
    model = dataclasses.replace(model, decoder=sampling.LatentDecoder(
        run.decoder.module, jax.tree.map(lambda _: replicated, run.decoder.params)))
  # `sampling_params` of the model holding shardings is the shardings of the sampler's params.
  sample_fn = sampling.make_sampler(
      sampling.make_batch_fn(model, config.sample.sampler), run.mesh, batch_size=batch_size,
      params_shardings=model.sampling_params, require_finite=False)
  if run.decoder is not None:
    model = dataclasses.replace(model, decoder=sampling.LatentDecoder(
        run.decoder.module, sampling.replicate(run.decoder.params, run.mesh)))
  key_data = np.asarray(jax.random.key_data(
      jax.random.fold_in(jax.random.key(config.seed), stream)))

  def generate(state: state_lib.TrainState, num_images: int, first_index: int = 0) -> np.ndarray:
    labels = sampling.example_labels(first_index + num_images, (), model.num_classes)
    params = dataclasses.replace(model, params=state.ema_params[ema]).sampling_params
    return sample_fn(params, labels[first_index:], key_data, first_index)
  return generate


__all__ = ["Run", "build_run", "init_state", "make_step_fn", "make_ema_sampler", "root_key",
           "INIT_STREAM", "TRAIN_STREAM", "PREVIEW_STREAM", "FID_STREAM"]
