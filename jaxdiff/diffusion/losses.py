"""Training inputs and the per-example diffusion loss (simple loss, min-SNR, hybrid VLB)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import targets
from jaxdiff.diffusion.likelihood import mean_flat, p_mean_log_variance, vlb_term
from jaxdiff.diffusion.schedules import Schedule

LOSS_TYPES = ("l2", "l1", "huber")
WEIGHTINGS = ("none", "min_snr")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def training_inputs(schedule: Schedule, example_keys: jax.Array,
                    x0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Draws t ~ U{0, ..., T-1} and ε ~ N(0, I) for each example from its own key.

  Args:
    schedule: the schedule.
    example_keys: [B] keys (typed, or raw uint32 [B, 2]), one per example.
    x0: [B, ...] the batch (only its shape is used).

  Returns:
    (t int32 [B], noise float32 [B, ...]); row i depends only on example_keys[i].
  """
  def draw(key):
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, (), 0, schedule.num_timesteps, dtype=jnp.int32)
    return t, jax.random.normal(key_noise, x0.shape[1:], jnp.float32)

  return jax.vmap(draw)(example_keys)


def min_snr_weight(snr: jax.Array, prediction: str, gamma: float) -> jax.Array:
  """Min-SNR-γ weights (Hang et al. 2023, eq. 13), expressed for each prediction target.

  The paper weights the x_0-space error by w = min(SNR, γ). Since ‖ε - ε̂‖² = SNR ‖x_0 - x̂_0‖²
  and ‖v - v̂‖² = (SNR + 1) ‖x_0 - x̂_0‖², the same weighting is min(SNR, γ) for x0,
  min(SNR, γ) / SNR = min(1, γ / SNR) for eps and min(SNR, γ) / (SNR + 1) for v.

  Args:
    snr: [B] SNR_t = ᾱ_t / (1 - ᾱ_t) (see `schedule_snr`).
    prediction: `eps | x0 | v`.
    gamma: γ.

  Returns:
    [B] float32 weights (finite at SNR = 0 for every target).
  """
  targets.check_prediction(prediction)
  clipped = jnp.minimum(snr, gamma)
  if prediction == "eps":
    return jnp.minimum(1.0, gamma / snr)
  if prediction == "x0":
    return clipped
  return clipped / (snr + 1.0)


def schedule_snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """SNR_t [B] from the sqrt tables, which keep full relative precision where 1 - ᾱ_t is tiny."""
  return (schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])**2


def elementwise_loss(diff: jax.Array, loss_type: str, huber_delta: float) -> jax.Array:
  """l2: d²; l1: |d|; huber: ½d² for |d| <= δ, else δ(|d| - ½δ) (PyTorch's `huber_loss`;
  smooth-L1 with β equals huber with δ = β divided by β, so they agree at δ = β = 1)."""
  if loss_type == "l2":
    return diff**2
  if loss_type == "l1":
    return jnp.abs(diff)
  magnitude = jnp.abs(diff)
  return jnp.where(magnitude <= huber_delta, 0.5 * diff**2,
                   huber_delta * (magnitude - 0.5 * huber_delta))


def _validate(prediction, loss_type, weighting):
  targets.check_prediction(prediction)
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} is unknown; choose one of {LOSS_TYPES}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is unknown; choose one of {WEIGHTINGS}")


def diffusion_loss(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, t: jax.Array,
                   noise: jax.Array, *, prediction: str = "eps", loss_type: str = "l2",
                   huber_delta: float = 1.0, weighting: str = "none", min_snr_gamma: float = 5.0,
                   learn_sigma: bool = False,
                   vlb_weight: float = 1e-3) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example training loss: w_t · mean ℓ(f(x_t, t) - target) [+ λ T L_{t-1}].

  The simple term regresses the `prediction` target (Ho et al. eq. 14 for eps). With
  `learn_sigma` the model outputs 2C channels and the hybrid loss of Improved DDPM (eq. 16) adds
  λ · T · L_{t-1}, the one-sample estimate of λ L_vlb, where L_{t-1} (in bits per dimension) uses
  a stop-gradient on the mean channels so that only the variance channels learn from it (sec. 3.1).
  With λ = 1e-3 and T = 1000 this equals ADM's `vb * num_timesteps / 1000`.

  Args:
    model_fn: `(x_t [B,...,C], t int32 [B]) -> [B,...,C]`, or 2C channels with `learn_sigma`.
    schedule: the schedule.
    x0: [B, ..., C] clean data.
    t: [B] int32 timesteps (see `training_inputs`).
    noise: [B, ..., C] ε.
    prediction: `eps | x0 | v`.
    loss_type: `l2 | l1 | huber`.
    huber_delta: δ of the huber loss.
    weighting: `none | min_snr` (see `min_snr_weight`).
    min_snr_gamma: γ of min-SNR weighting.
    learn_sigma: hybrid loss with learned variance.
    vlb_weight: λ.

  Returns:
    (loss [B] float32, aux) with aux["loss_simple"] the unweighted simple term [B],
    aux["weight"] [B] and, with `learn_sigma`, aux["vlb"] = L_{t-1} in bits per dimension [B].
  """
  _validate(prediction, loss_type, weighting)
  channels = x0.shape[-1]
  x_t = targets.q_sample(schedule, x0, t, noise)
  output = model_fn(x_t, t).astype(jnp.float32)
  expected = 2 * channels if learn_sigma else channels
  if output.shape[-1] != expected:
    raise ValueError(f"model output has {output.shape[-1]} channels; learn_sigma={learn_sigma} "
                     f"expects {expected}")
  alpha_bar = schedule.alphas_cumprod[t]
  target = targets.prediction_target(prediction, x0, noise, alpha_bar)
  loss_simple = mean_flat(elementwise_loss(output[..., :channels] - target, loss_type, huber_delta))
  if weighting == "min_snr":
    weight = min_snr_weight(schedule_snr(schedule, t), prediction, min_snr_gamma)
  else:
    weight = jnp.ones_like(loss_simple)
  loss = weight * loss_simple
  aux = {"loss_simple": loss_simple, "weight": weight}
  if learn_sigma:
    frozen = jnp.concatenate(
        [jax.lax.stop_gradient(output[..., :channels]), output[..., channels:]], axis=-1)
    mean, log_var, _ = p_mean_log_variance(
        schedule, frozen, x_t, t, prediction=prediction, variance="learned")
    vlb = vlb_term(schedule, x0, x_t, t, mean, log_var)
    loss = loss + vlb_weight * schedule.num_timesteps * vlb
    aux["vlb"] = vlb
  return loss, aux
