"""The pure train step and its jitted, sharded, multi-step driver.

Randomness never depends on the device layout: the step key is `fold_in(base_key, step)` and each
example's timestep and noise come from `fold_in(step_key, global_index)`; the model's dropout
(and label dropout) key is `fold_in(step_key, DROPOUT_STREAM)`, drawn for the whole global batch.
With partitionable threefry these values are the same on 1 or N devices, so the loss trajectory
is too (up to reduction order).

Text-to-image batches carry each example's caption embedding ("context" [B, L, D]); caption
dropout replaces example i's by the empty prompt's embedding when a Bernoulli draw from
`fold_in(example_key_i, CAPTION_STREAM)` says so, so it too is independent of the device count.

`objective_loss` dispatches on `config.diffusion.objective`: ddpm (`diffusion_loss` at integer t),
flow (`flow.flow_matching_loss`, the model fed t · T) or edm (`edm.edm_loss` of the preconditioned
network, which receives c_noise = ¼ ln σ as its timestep). An autoencoder run (config.task =
"autoencoder", `autoencoder` given) takes the same step with LDM's reconstruction + KL loss
(`models.autoencoder.autoencoder_loss`), example i's posterior draw from its key as above.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff.config import AutoencoderConfig, DiffusionConfig
from jaxdiff.diffusion import (Schedule, diffusion_loss, edm, flow, per_example_keys,
                               training_inputs)
from jaxdiff.models.autoencoder import autoencoder_loss
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train.state import TrainState, update_ema

# fold_in constant of the dropout key: above any global example index, so never an example's key.
DROPOUT_STREAM = 2**31 - 1
# fold_in constant of an example's caption-dropout draw from its own key (whose timestep and noise
# come from splitting it, never from fold_in, so the streams never meet).
CAPTION_STREAM = 2**31 - 2
NUM_TIME_BINS = 4


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               apply_fn: Callable[..., jax.Array], tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, schedule: Schedule, diffusion: DiffusionConfig,
               conditional: bool, learn_sigma: bool, ema_decays: tuple[float, ...],
               skip_nonfinite: bool = False, autoencoder: AutoencoderConfig | None = None,
               caption_dropout_prob: float = 0.0, null_context: Any = None
               ) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch.

  Args:
    state: current train state.
    batch: {"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]} (global batch), and
      for a text-to-image model "context": float32 [B, L, D], which the model receives in place
      of labels.
    key: base key of the run; the step's key is fold_in(key, state.step).
    apply_fn: the model's `apply`.
    tx: optimizer.
    lr_schedule: learning rate of step (logged only).
    schedule: noise schedule.
    diffusion: loss options.
    conditional: pass the labels to the model (else y=None).
    learn_sigma: the model also outputs the variance interpolation (adds the VLB term).
    ema_decays: EMA rates, matching `state.ema_params`.
    skip_nonfinite: when the loss or gradient norm is NaN/Inf, keep params, EMA and optimizer
      state unchanged (the step counter still advances, so the data position does too).
    autoencoder: train an `AutoencoderKL` with this reconstruction + KL loss instead (schedule,
      diffusion, conditional and learn_sigma are then unused).
    caption_dropout_prob: probability of replacing an example's context by `null_context`.
    null_context: float32 [L, D], the empty prompt's embedding (with caption dropout).

  Returns:
    (new state, metrics): scalars "train/loss", "train/grad_norm" (before clipping),
    "train/param_norm", "train/learning_rate", and per timestep quartile q the sum and count of
    per-example losses ("train/loss_q{q}_sum", "train/loss_q{q}_count"), or for an autoencoder
    the batch means "train/reconstruction" and "train/kl"; with `skip_nonfinite`, also
    "train/skipped_update" (1.0 when this step's update was dropped).
  """
  step_key = jax.random.fold_in(key, state.step)
  x0 = batch["image"]
  labels = batch["label"] if conditional else None
  example_keys = per_example_keys(step_key, jnp.arange(x0.shape[0]))
  dropout_key = jax.random.fold_in(step_key, DROPOUT_STREAM)
  if "context" in batch:
    labels = batch["context"]
    if caption_dropout_prob > 0:
      labels, _ = caption_dropout(labels, null_context, example_keys, caption_dropout_prob)

  def loss_fn(params):
    if autoencoder is not None:
      per_example, parts = autoencoder_loss(apply_fn, params, x0, example_keys,
                                            loss_type=autoencoder.loss_type,
                                            kl_weight=autoencoder.kl_weight)
      return jnp.mean(per_example), {f"train/{k}": jnp.mean(v) for k, v in parts.items()}

    def model_fn(x_t, timesteps):
      return apply_fn({"params": params}, x_t, timesteps, labels, train=True,
                      rngs={"dropout": dropout_key})
    per_example, time = objective_loss(model_fn, x0, example_keys, schedule=schedule,
                                       diffusion=diffusion, learn_sigma=learn_sigma)
    return jnp.mean(per_example), _loss_by_time_bin(per_example, time)

  (loss, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params,
                         ema_params=update_ema(state.ema_params, params, ema_decays),
                         opt_state=opt_state)
  metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
             "train/param_norm": optax.global_norm(params),
             "train/learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32)}
  metrics.update(loss_metrics)
  if skip_nonfinite:
    new_state, metrics["train/skipped_update"] = _keep_if_nonfinite(state, new_state, metrics)
  return new_state, metrics


def caption_dropout(context: jax.Array, null_context: Any, example_keys: jax.Array,
                    prob: float) -> tuple[jax.Array, jax.Array]:
  """Replaces captions by the empty prompt with probability `prob` (classifier-free guidance).

  Args:
    context: [B, L, D] caption embeddings.
    null_context: [L, D] the empty prompt's embedding.
    example_keys: [B] keys of the examples; example i's draw is
      bernoulli(fold_in(example_keys[i], CAPTION_STREAM), prob).
    prob: dropout probability.

  Returns:
    (context with the dropped rows replaced [B, L, D], dropped bool [B]).
  """
  draw = lambda key: jax.random.bernoulli(jax.random.fold_in(key, CAPTION_STREAM), prob)
  dropped = jax.vmap(draw)(example_keys)
  null = jnp.asarray(null_context, context.dtype)
  return jnp.where(dropped[:, None, None], null[None], context), dropped


def _keep_if_nonfinite(old: TrainState, new: TrainState, metrics: dict) -> tuple[TrainState, jax.Array]:
  """`new` if loss and gradient norm are finite, else `old` with only the step advanced.

  A select on every leaf (not `lax.cond`): both branches are already computed, and a select keeps
  the state's shardings and donation intact.
  """
  finite = jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(metrics["train/grad_norm"])
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return kept.replace(step=new.step), jnp.where(finite, 0.0, 1.0).astype(jnp.float32)


def objective_loss(model_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                   example_keys: jax.Array, *, schedule: Schedule, diffusion: DiffusionConfig,
                   learn_sigma: bool) -> tuple[jax.Array, jax.Array]:
  """Draws each example's noise level and noise from its key and returns its loss.

  Args:
    model_fn: `(x [B, H, W, C], timestep float32 or int32 [B]) -> [B, H, W, C]`, the network.
    x0: [B, H, W, C] clean images.
    example_keys: [B] keys, one per example.
    schedule: the noise schedule (ddpm).
    diffusion: the objective and its options.
    learn_sigma: the network also outputs variance channels (ddpm only).

  Returns:
    (loss [B], time [B] in [0, 1]: where the noise level lies from clean to pure noise; ddpm
    t / T, flow t, edm the quantile of σ under its training distribution, Φ((ln σ - P_mean) /
    P_std)).
  """
  if diffusion.objective == "flow":
    t, noise = flow.flow_training_inputs(
        example_keys, x0, sampling=diffusion.flow_timestep_sampling, shift=diffusion.flow_shift,
        logit_mean=diffusion.flow_logit_mean, logit_std=diffusion.flow_logit_std,
        mode_scale=diffusion.flow_mode_scale)
    loss, _ = flow.flow_matching_loss(model_fn, x0, t, noise,
                                      num_timesteps=diffusion.num_timesteps)
    return loss, t
  if diffusion.objective == "edm":
    sigma, noise = edm.edm_training_inputs(example_keys, x0, p_mean=diffusion.edm_p_mean,
                                           p_std=diffusion.edm_p_std)
    denoiser = edm.precondition(model_fn, diffusion.edm_sigma_data)
    loss, _ = edm.edm_loss(denoiser, x0, sigma, noise, sigma_data=diffusion.edm_sigma_data)
    return loss, jax.scipy.special.ndtr((jnp.log(sigma) - diffusion.edm_p_mean) /
                                        diffusion.edm_p_std)
  t, noise = training_inputs(schedule, example_keys, x0)
  loss, _ = diffusion_loss(
      model_fn, schedule, x0, t, noise, prediction=diffusion.prediction,
      loss_type=diffusion.loss_type, huber_delta=diffusion.huber_delta,
      weighting=diffusion.weighting, min_snr_gamma=diffusion.min_snr_gamma,
      learn_sigma=learn_sigma, vlb_weight=diffusion.vlb_weight)
  return loss, t / schedule.num_timesteps


def _loss_by_time_bin(per_example: jax.Array, time: jax.Array) -> dict:
  """Sum and count of per-example losses in each quartile of `time` (averaged on the host)."""
  bins = jnp.minimum((time * NUM_TIME_BINS).astype(jnp.int32), NUM_TIME_BINS - 1)
  out = {}
  for q in range(NUM_TIME_BINS):
    mask = (bins == q).astype(jnp.float32)
    out[f"train/loss_q{q}_sum"] = jnp.sum(per_example * mask)
    out[f"train/loss_q{q}_count"] = jnp.sum(mask)
  return out


def multi_step(state: TrainState, batches: dict[str, jax.Array], key: jax.Array,
               **step_kwargs) -> tuple[TrainState, dict]:
  """k train steps in one call: `lax.scan` over stacked batches [k, B, ...].

  Returns:
    (state after k steps, metrics with a leading [k] axis).
  """
  if jax.tree.leaves(batches)[0].shape[0] == 1:
    # No loop for k = 1: XLA:CPU runs convolutions inside a while loop about 10x slower.
    state, metrics = train_step(state, jax.tree.map(lambda x: x[0], batches), key, **step_kwargs)
    return state, jax.tree.map(lambda x: x[None], metrics)

  def body(carry, batch):
    return train_step(carry, batch, key, **step_kwargs)
  return jax.lax.scan(body, state, batches)


def jit_train_step(mesh: Mesh, state_shardings: Any, **step_kwargs) -> Callable:
  """`multi_step` jitted once with explicit shardings and the state donated.

  Args:
    mesh: ("data", "fsdp") mesh.
    state_shardings: NamedShardings of the TrainState (see sharding.state_shardings).
    **step_kwargs: static arguments of `train_step` (apply_fn, tx, ...).

  Returns:
    fn(state, batches [k, B, ...], key) -> (state, metrics [k]); metrics are replicated.
  """
  return jax.jit(
      functools.partial(multi_step, **step_kwargs),
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, leading_dims=1),
                    sharding_lib.replicated(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0)
