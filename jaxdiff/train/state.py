"""Train state (params, EMA params, optimizer state, step) and the optimizer that updates it.

The state holds arrays only; the model's `apply` and the optax transformation are passed to the
step function separately, so the whole state is one checkpointable pytree.
"""

import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.config import (Config, ConfigError, OptimizerConfig, model_fields,
                            pipeline_unet_config)
from jaxdiff.data import DatasetInfo
from jaxdiff.models import AutoencoderKL, UNetCond, build_autoencoder, build_model


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: float32 model parameters.
    ema_params: {ema_key(decay): float32 params}, one exponential moving average per decay.
    opt_state: optax state (float32 moments).
  """
  step: jax.Array
  params: Any
  ema_params: dict[str, Any]
  opt_state: Any


def ema_key(decay: float) -> str:
  """Name of an EMA copy in the state, e.g. 0.9999 -> "ema_0p9999" (no '.', which checkpoint
  paths use as a separator)."""
  return "ema_" + repr(float(decay)).replace(".", "p")


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then constant or cosine decay to the end of training.

  Args:
    config: optimizer section of the config.
    num_steps: total training steps (the cosine reaches its end value there).

  Returns:
    step -> learning rate.
  """
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  if config.decay == "cosine":
    after = optax.cosine_decay_schedule(
        config.learning_rate, max(num_steps - config.warmup_steps, 1),
        alpha=config.end_lr_fraction)
  else:
    after = optax.constant_schedule(config.learning_rate)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup (and optional cosine decay) after global-norm gradient clipping.

  Returns:
    (transformation, learning-rate schedule) — the schedule is also logged.
  """
  schedule = learning_rate_schedule(config, num_steps)
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
  return adamw, schedule


def create_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 ema_decays: Sequence[float], key: jax.Array) -> TrainState:
  """Initial state: fresh params, EMA copies equal to them, zero optimizer moments.

  Args:
    init_params: key -> params pytree (e.g. `lambda k: model.init(k, ...)["params"]`).
    tx: the optimizer.
    ema_decays: one EMA copy per decay rate.
    key: init key.

  Returns:
    TrainState at step 0; params, EMA and moments are float32.
  """
  params = jax.tree.map(lambda p: p.astype(jnp.float32), init_params(key))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params={ema_key(d): jax.tree.map(jnp.copy, params) for d in ema_decays},
      opt_state=tx.init(params))


def update_ema(ema_params: dict[str, Any], params: Any, ema_decays: Sequence[float]
               ) -> dict[str, Any]:
  """ema <- d * ema + (1 - d) * params, in float32, for each decay d."""
  new = {}
  for decay in ema_decays:
    key = ema_key(decay)
    new[key] = jax.tree.map(
        lambda e, p, d=decay: d * e + (1.0 - d) * p.astype(jnp.float32), ema_params[key], params)
  return new


def init_params_fn(model, image_size: int, channels: int, conditional: bool,
                   context_dim: int = 0) -> Callable[[jax.Array], Any]:
  """key -> freshly initialised params of `model` for [image_size, image_size, channels] images
  (a denoiser, called with x, t, y: labels, a text context [B, S, context_dim] when
  context_dim > 0, or nothing; or an `AutoencoderKL`, called with x)."""
  def init(key):
    x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    if isinstance(model, AutoencoderKL):
      return model.init(key, x)["params"]
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    if context_dim:
      y = jnp.zeros((1, 1, context_dim), jnp.float32)
    return model.init({"params": key, "dropout": key}, x, t, y, train=False)["params"]
  return init


def make_model(config: Config, info: DatasetInfo) -> nn.Module:
  """The Flax module of `config` for the dataset `info` (task=autoencoder: an AutoencoderKL; a
  text-to-image run: the U-Net of `config.text.pipeline`, its layout from unet/config.json)."""
  if config.text.enabled:
    return _pipeline_unet(config)
  fields = model_fields(config.model, info, config.task)
  if config.task == "autoencoder":
    return build_autoencoder(config.model.name, **fields)
  return build_model(config.model.name, **fields)


def _pipeline_unet(config: Config) -> UNetCond:
  """The UNetCond of the pipeline's unet/config.json (ConfigError if jaxdiff cannot express it)."""
  from jaxdiff.convert.unet_cond import unet_cond_fields  # pylint: disable=g-import-not-at-top
  try:
    fields = unet_cond_fields(pipeline_unet_config(config.text.pipeline))
  except ValueError as error:
    raise ConfigError(f"config.text.pipeline={config.text.pipeline!r}: its U-Net is not "
                      f"supported: {error}") from None
  return UNetCond(**{**fields, **config.model.overrides}, dtype=getattr(jnp, config.model.dtype),
                  param_dtype=jnp.float32)


def context_dim(config: Config) -> int:
  """Width of the text context a text-to-image run's U-Net cross-attends to; 0 otherwise."""
  if not config.text.enabled:
    return 0
  return int(pipeline_unet_config(config.text.pipeline).get("cross_attention_dim", 1280))


def pipeline_params(config: Config) -> Any:
  """The U-Net weights of `config.text.pipeline` in the layout of `make_model`, float32."""
  from jaxdiff.convert import load_diffusers  # pylint: disable=g-import-not-at-top
  _, params = load_diffusers(os.path.join(config.text.pipeline, "unet"))
  return jax.tree.map(lambda p: np.asarray(p, np.float32), params)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, config: Config,
                   info: DatasetInfo) -> TrainState:
  """The TrainState of `model` and `tx` as ShapeDtypeStructs, without allocating anything."""
  init = init_params_fn(model, info.image_size, info.channels, config.model.class_conditional,
                        context_dim(config))
  return jax.eval_shape(lambda key: create_state(init, tx, config.train.ema_decays, key),
                        jax.random.key(0))
