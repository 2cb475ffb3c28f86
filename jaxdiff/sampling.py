"""The one sharded sampler: used by `python -m jaxdiff.sample`, the training previews and FID
during training. Its result does not depend on the device count.

Every random draw of sample i comes from its own key `fold_in(base_key, i)`, i the sample's global
index: x_T is drawn from the first half of `split(key_i)` and the sampler's step noise from the
second; the label of sample i is a function of i as well. So the samples for indices [0, n) are
the same on 1 or 8 devices, for any batch size, and whether n or more samples are drawn.

Latent and text conditioning compose here (Rombach et al. 2022): encode the prompts once ->
sample latents -> decode. A text-conditioned model (Stable Diffusion) carries a table of P
encoded prompts (`TextConditioning`); sample i is conditioned on prompt `i % P`, an index that
travels through the sharded sampler exactly as a class label does, so the contexts themselves
are never copied per sample. A latent model carries its autoencoder (`LatentDecoder`), which
decodes inside the jitted batch function: the decoded images leave the devices, sharded like
the latents, and the decoder's memory is that of one sampler call (lower --batch_size for large
images).

Every process runs the same global computation over a mesh of all devices (the batch split over
every mesh axis); the results are gathered to every process.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff import diffusion, images
from jaxdiff import text as text_lib
from jaxdiff.config import DiffusionConfig
from jaxdiff.diffusion import SamplerSettings, edm, flow
from jaxdiff.models import autoencoder as autoencoder_lib

# Images in the sample grid PNG and in the reverse-process GIF (the first ones of the run).
GRID_IMAGES = 64
ANIMATION_IMAGES = 16

# (params, base key data uint32 [2], global indices int32 [B], labels int32 [B])
#   -> float32 [B, ...]. `params` is `DiffusionModel.sampling_params`; a label is a class or,
#   for a text-conditioned model, the index of a prompt.
BatchFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
# (params, labels int [N], base key data uint32 [2], first_index) -> uint8 [N, ...].
SampleFn = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class LatentDecoder:
  """The autoencoder that turns a latent diffusion model's samples into images.

  Attributes:
    module: the KL autoencoder; its `scaling_factor` / `shift_factor` undo the latent scale.
    params: its parameters.
  """
  module: autoencoder_lib.AutoencoderKL
  params: Any

  def decode(self, params, z_model: jax.Array) -> jax.Array:
    """Latents on the diffusion model's scale [B, h, w, c] -> float32 images [B, H, W, C]."""
    z = autoencoder_lib.unscale_latents(self.module, z_model)
    return self.module.apply({"params": params}, z, method=self.module.decode)


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """The encoded prompts of a text-conditioned model; sample i gets prompt `i % P`.

  Attributes:
    prompts: the P prompts, as given (recorded with the samples).
    contexts: float32 [P, L, D], the text encoder's output for each prompt.
    negative_context: float32 [L, D], the negative prompt's (the empty prompt's by default):
      the unconditional half of classifier-free guidance, as in StableDiffusionPipeline.
  """
  prompts: tuple[str, ...]
  contexts: Any
  negative_context: Any


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
  """A trained denoiser and what is needed to sample from it.

  Attributes:
    module: Flax module called as `module.apply({"params": params}, x, t, y)` (models contract).
    params: its parameters.
    schedule: the noise schedule it was trained with (ddpm; for flow its num_timesteps is the
      timestep scale T of the network's input t · T).
    prediction: what the network predicts: eps | x0 | v (ddpm objective).
    image_shape: (H, W, C) of one sample of the diffusion model (latents for a latent model).
    num_classes: 0 for an unconditional (or text-conditioned) model; the null label is
      `num_classes`.
    learn_sigma: the network also outputs C variance channels (after the C prediction channels).
    has_null_label: the label `num_classes` means "no label" (needed by guidance).
    scheduler_kwargs: options of the objective's sampler that describe the model's own scheduler
      (a diffusers scheduler config: steps_offset, set_alpha_to_one, final_sigmas_type, ...;
      flow: shift).
    objective: what it was trained for, one of `diffusion.OBJECTIVES`: ddpm (`diffusion.sample`),
      flow (a velocity model, `flow.sample_flow`), edm (the network F of the preconditioned
      denoiser, `edm.sample_edm`).
    sigma_data: σ_d of the EDM preconditioning (edm objective).
    decoder: the autoencoder of a latent model (samples are decoded to images), or None.
    text: the prompts of a text-conditioned model, called as `module.apply({"params": p}, x, t,
      context [B, L, D])`, or None.
  """
  module: nn.Module
  params: Any
  schedule: diffusion.Schedule
  prediction: str
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  learn_sigma: bool = False
  has_null_label: bool = False
  scheduler_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  objective: str = "ddpm"
  sigma_data: float = edm.SIGMA_DATA
  decoder: LatentDecoder | None = None
  text: TextConditioning | None = None

  @property
  def output_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one output image: decoded for a latent model, else `image_shape`."""
    if self.decoder is None:
      return self.image_shape
    z = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
    return tuple(jax.eval_shape(self.decoder.decode, self.decoder.params, z).shape[1:])

  @property
  def sampling_params(self) -> Any:
    """What `make_sampler`'s `sample_fn` takes as params: the denoiser's, or for a latent or
    text-conditioned model {denoiser, decoder, contexts, negative_context}."""
    if self.decoder is None and self.text is None:
      return self.params
    return {"denoiser": self.params,
            "decoder": None if self.decoder is None else self.decoder.params,
            "contexts": None if self.text is None else self.text.contexts,
            "negative_context": None if self.text is None else self.text.negative_context}

  @classmethod
  def from_module(cls, module: nn.Module, params: Any, schedule: diffusion.Schedule,
                  prediction: str, image_shape: tuple[int, int, int],
                  scheduler_kwargs: Mapping[str, Any] | None = None, *, objective: str = "ddpm",
                  sigma_data: float = edm.SIGMA_DATA) -> "DiffusionModel":
    """Reads the conditioning from a jaxdiff backbone (UNet or DiT: `num_classes`,
    `class_dropout_prob`, `learn_sigma`; a text-conditioned UNetCond has none of them), whether
    built from a config or a diffusers folder."""
    num_classes = getattr(module, "num_classes", 0)
    return cls(module=module, params=params, schedule=schedule, prediction=prediction,
               image_shape=tuple(image_shape), num_classes=num_classes,
               learn_sigma=getattr(module, "learn_sigma", False),
               has_null_label=num_classes > 0 and module.class_dropout_prob > 0,
               scheduler_kwargs=dict(scheduler_kwargs or {}), objective=objective,
               sigma_data=sigma_data)

  @classmethod
  def from_config(cls, module: nn.Module, params: Any, config: DiffusionConfig,
                  image_shape: tuple[int, int, int]) -> "DiffusionModel":
    """The model of a training run: schedule, prediction and objective from its config."""
    scheduler_kwargs = {"shift": config.flow_shift} if config.objective == "flow" else {}
    return cls.from_module(
        module, params, diffusion.make_schedule(config.schedule, config.num_timesteps),
        config.prediction, image_shape, scheduler_kwargs, objective=config.objective,
        sigma_data=config.edm_sigma_data)


def seed_key_data(seed: int) -> np.ndarray:
  """The raw data (uint32 [2]) of `jax.random.key(seed)`, the base key of a sampling run."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


def example_labels(num_samples: int, labels: Sequence[int], num_classes: int) -> np.ndarray:
  """Label of each sample index: `labels[i % len(labels)]`, or `i % num_classes` if none given.

  Returns:
    int32 [num_samples]; zeros for an unconditional model (the labels are then unused).
  """
  indices = np.arange(num_samples)
  if num_classes == 0:
    return np.zeros(num_samples, np.int32)
  if len(labels):
    return np.asarray(labels, np.int32)[indices % len(labels)]
  return (indices % num_classes).astype(np.int32)


def encode_prompts(tokenizer: Callable[[Sequence[str]], np.ndarray], encoder: nn.Module,
                   encoder_params: Any, prompts: Sequence[str],
                   negative_prompt: str = "") -> TextConditioning:
  """Tokenises and encodes the prompts once (StableDiffusionPipeline.encode_prompt, no clip skip).

  Args:
    tokenizer: prompts [P] -> int token ids [P, L] padded to the encoder's length (e.g.
      `jaxdiff.text.load_tokenizer`; it truncates over-long prompts with a warning).
    encoder: a text encoder whose output has a `context` [P, L, D] (`CLIPTextEncoder`).
    encoder_params: its parameters.
    prompts: P >= 1 prompts.
    negative_prompt: the unconditional prompt of guidance ("" as diffusers' default).

  Returns:
    TextConditioning with float32 contexts [P, L, D] and negative_context [L, D].
  """
  if not prompts:
    raise ValueError("need at least one prompt")
  contexts = text_lib.encode_texts(tokenizer, encoder, encoder_params,
                                   [*prompts, negative_prompt])
  return TextConditioning(tuple(prompts), contexts[:-1], contexts[-1])


def _model_fn(model: DiffusionModel, params, labels: jax.Array, guided: bool):
  """`(x [B', H, W, C], t [B']) -> prediction` with the labels [B] bound.

  With guidance B' = 2B: the first half gets the labels, the second the null label, as
  `jaxdiff.diffusion.sample` expects. For a text model the labels index `params["contexts"]`,
  and the second half gets the negative context.
  """
  bundled = model.text is not None or model.decoder is not None  # see `sampling_params`
  denoiser_params = params["denoiser"] if bundled else params
  if model.text is not None:
    y = params["contexts"][labels]
    if guided:
      y = jnp.concatenate([y, jnp.broadcast_to(params["negative_context"], y.shape)])
  elif model.num_classes == 0:
    y = None
  elif guided:
    y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
  else:
    y = labels

  def model_fn(x, t):
    return model.module.apply({"params": denoiser_params}, x, t, y, train=False)

  return model_fn


def make_batch_fn(model: DiffusionModel, settings: SamplerSettings, *,
                  trajectory: bool = False) -> BatchFn:
  """Builds the pure per-batch sampler that `make_sampler` shards and jits.

  Args:
    model: the denoiser.
    settings: sampler settings (`clip_denoised` resolved to a bool).
    trajectory: return the reverse process instead of only the final samples.

  Returns:
    `(params, base_key_data [2], indices [B], labels [B]) -> float32 [B, H, W, C]`, or with
    `trajectory` `[B, F, H, W, C]` (F states x_t from x_T to the final sample), decoded to images
    for a latent model. `params` is `model.sampling_params`: an argument rather than a closure so
    that it is not baked into the executable.
  """
  def batch_fn(params, base_key_data, indices, labels):
    keys = diffusion.per_example_keys(jax.random.wrap_key_data(base_key_data), indices)
    split_keys = jax.vmap(jax.random.split)(keys)
    x_T = jax.vmap(lambda k: jax.random.normal(k, model.image_shape, jnp.float32))(
        split_keys[:, 0])
    model_fn = _model_fn(model, params, labels, settings.guided)
    result = _run_sampler(model, settings, model_fn, x_T, split_keys[:, 1], trajectory)
    if trajectory:
      return jnp.moveaxis(_decode(model, params, result[1], frames=True), 0, 1)
    return _decode(model, params, result)

  return batch_fn


def _run_sampler(model: DiffusionModel, settings: SamplerSettings, model_fn, x_T: jax.Array,
                 keys: jax.Array, trajectory: bool):
  """The sampler of the model's objective on x_T [B, H, W, C] with per-example keys [B]."""
  if model.objective == "flow":
    return flow.sample_flow(model_fn, x_T, keys, num_timesteps=model.schedule.num_timesteps,
                            return_trajectory=trajectory,
                            **model.scheduler_kwargs, **settings.flow_kwargs())
  if model.objective == "edm":
    return edm.sample_edm(edm.precondition(model_fn, model.sigma_data), x_T, keys,
                          return_trajectory=trajectory, **settings.edm_kwargs())
  # Guidance is applied by `sample` to the first C output channels only, so learned-variance
  # channels pass through from the conditional half.
  kwargs = {"variance": "learned" if model.learn_sigma else "fixed_small",
            **model.scheduler_kwargs, **settings.sample_kwargs()}
  return diffusion.sample(model_fn, model.schedule, x_T, keys, prediction=model.prediction,
                          return_trajectory=trajectory, **kwargs)


def _decode(model: DiffusionModel, params, z: jax.Array, frames: bool = False) -> jax.Array:
  """Decodes latents [B, ...] (or trajectory frames [F, B, ...], one frame at a time, so memory
  does not grow with F); identity for a pixel-space model."""
  if model.decoder is None:
    return z
  decode = functools.partial(model.decoder.decode, params["decoder"])
  return jax.lax.map(decode, z) if frames else decode(z)


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def _replicated_array(leaf, sharding: NamedSharding) -> jax.Array:
  """A parameter copied to every device of the mesh, whichever process or device holds it now."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return jax.jit(lambda x: x, out_shardings=sharding)(leaf)
  return global_array(np.asarray(leaf), sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of `tree` copied to every device of `mesh`, whichever process or device holds it."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda leaf: _replicated_array(leaf, sharding), tree)


def make_sampler(batch_fn: BatchFn, mesh: Mesh, *, batch_size: int, params_shardings: Any = None,
                 progress: bool = False, require_finite: bool = True) -> SampleFn:
  """The sharded sampler, jitted once: `sample_fn(params, labels, base_key_data, first_index=0)`.

  `sample_fn` draws the samples of global indices [first_index, first_index + N) (N =
  len(labels)) in calls of `batch_size` samples (rounded up to the device count; the last call
  padded with extra indices that are dropped), each split over every axis of the mesh. The next
  call is dispatched before the previous one is fetched, keeping the devices busy.

  Args:
    batch_fn: the per-batch sampler, `make_batch_fn(model, settings[, trajectory=True])`.
    mesh: device mesh (any axes; the batch is split over all of them).
    batch_size: samples per sampler call, all devices together.
    params_shardings: shardings of the params passed to `sample_fn` (e.g. a training run's
      fsdp layout); None replicates them on every device.
    progress: show a tqdm bar (images done, images/s) on process 0.
    require_finite: raise FloatingPointError if a sample is NaN or infinite.

  Returns:
    `sample_fn(params, labels int [N], base_key_data uint32 [2], first_index=0)` -> uint8
    [N, H, W, C] (`jaxdiff.images.to_uint8` of the samples, decoded for a latent model;
    [N, F, H, W, C] for a trajectory batch_fn), on every process. `params` is
    `model.sampling_params`; `labels` are class labels or, for a text model, prompt indices.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  data = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(batch_fn, in_shardings=(params_shardings or replicated, replicated, data, data),
                   out_shardings=data)

  def sample_fn(params, labels, base_key_data, first_index: int = 0) -> np.ndarray:
    num_samples = len(labels)
    if num_samples < 1:
      raise ValueError("need at least one sample")
    per_call = min(batch_size, num_samples)
    padded = math.ceil(per_call / mesh.devices.size) * mesh.devices.size
    if params_shardings is None:
      params = jax.tree.map(lambda leaf: _replicated_array(leaf, replicated), params)
    key_data = global_array(np.asarray(base_key_data, np.uint32), replicated)
    padded_labels = np.concatenate([labels, np.zeros(padded, np.int32)]).astype(np.int32)

    def dispatch(start: int) -> jax.Array:
      indices = np.arange(first_index + start, first_index + start + padded, dtype=np.int32)
      return jitted(params, key_data, global_array(indices, data),
                    global_array(padded_labels[start:start + padded], data))

    starts = range(0, num_samples, per_call)
    output = None
    with tqdm.tqdm(total=num_samples, unit="img", desc="sampling",
                   disable=not progress or jax.process_index() != 0) as bar:
      pending = dispatch(starts[0])
      for position, start in enumerate(starts):
        # Queue the next batch before waiting for this one, so the devices never idle.
        following = dispatch(starts[position + 1]) if position + 1 < len(starts) else None
        count = min(per_call, num_samples - start)
        batch = _fetch(pending, count, require_finite)
        if output is None:
          output = np.empty((num_samples, *batch.shape[1:]), np.uint8)
        output[start:start + count] = batch
        bar.update(count)
        pending = following
    return output

  return sample_fn


def _fetch(result: jax.Array, count: int, require_finite: bool) -> np.ndarray:
  """Gathers a sharded batch to every process, keeps the first `count` rows and quantises them."""
  batch = multihost_utils.process_allgather(result, tiled=True)[:count]
  if require_finite and not np.all(np.isfinite(batch)):
    raise FloatingPointError(
        "the sampler produced NaN or inf; check the checkpoint, the schedule and the prediction "
        "type (eps/x0/v)")
  return images.to_uint8(batch)
