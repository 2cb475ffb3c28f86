"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

x = x_0 + σ n with σ ∈ [σ_min, σ_max]; the denoiser D(x; σ) ≈ E[x_0 | x] wraps the network F with
the preconditioning of Table 1: D = c_skip x + c_out F(c_in x, c_noise). Training draws
ln σ ~ N(P_mean, P_std²) and weights ‖D - x_0‖² by λ(σ) = (σ² + σ_d²) / (σ σ_d)². Sampling is
Algorithm 2 (Heun with optional stochastic churn) on σ_i = Karras et al.'s ρ-spaced levels
(eq. 5) plus σ_N = 0, driven by `samplers.scan_steps`. The network receives c_noise = ¼ ln σ as
its float32 timestep.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.guidance import classifier_free_guidance
from jaxdiff.diffusion.likelihood import mean_flat
from jaxdiff.diffusion import samplers
from jaxdiff.diffusion.schedules import karras_sigmas
from jaxdiff.diffusion.targets import expand

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SIGMA_DATA = 0.5


def preconditioning(sigma: jax.Array, sigma_data: float = SIGMA_DATA):
  """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for σ [B]:
  σ_d² / (σ² + σ_d²), σ σ_d / sqrt(σ² + σ_d²), 1 / sqrt(σ² + σ_d²), ¼ ln σ."""
  sigma = jnp.asarray(sigma, jnp.float32)
  total = sigma**2 + sigma_data**2
  return (sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total),
          0.25 * jnp.log(sigma))


def precondition(network_fn: ModelFn, sigma_data: float = SIGMA_DATA) -> ModelFn:
  """The denoiser D(x; σ) = c_skip x + c_out F(c_in x, c_noise) as a model wrapper.

  Args:
    network_fn: F, `(x [B,...], c_noise float32 [B]) -> [B,...]`.
    sigma_data: σ_d.

  Returns:
    `(x [B,...], σ [B]) -> D(x; σ)` float32.
  """
  def denoiser(x: jax.Array, sigma: jax.Array) -> jax.Array:
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    out = network_fn(expand(c_in, x) * x, c_noise).astype(jnp.float32)
    return expand(c_skip, x) * x + expand(c_out, x) * out

  return denoiser


def loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """λ(σ) = (σ² + σ_d²) / (σ σ_d)², which makes λ c_out² = 1 (effective weight of F's loss)."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def edm_training_inputs(example_keys: jax.Array, x0: jax.Array, *, p_mean: float = -1.2,
                        p_std: float = 1.2) -> tuple[jax.Array, jax.Array]:
  """Draws ln σ ~ N(P_mean, P_std²) and n ~ N(0, I) per example from its own key.

  Returns:
    (σ float32 [B], noise float32 [B, ...]).
  """
  def draw(key):
    key_sigma, key_noise = jax.random.split(key)
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(key_sigma, (), jnp.float32))
    return sigma, jax.random.normal(key_noise, x0.shape[1:], jnp.float32)

  return jax.vmap(draw)(example_keys)


def edm_loss(denoiser: ModelFn, x0: jax.Array, sigma: jax.Array, noise: jax.Array, *,
             sigma_data: float = SIGMA_DATA) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example λ(σ) mean ‖D(x_0 + σ n; σ) - x_0‖² (EDM eq. 8).

  Returns:
    (loss [B], aux with the unweighted aux["loss_simple"] [B] and aux["weight"] [B]).
  """
  x = x0 + expand(sigma, x0) * noise
  loss_simple = mean_flat((denoiser(x, sigma).astype(jnp.float32) - x0)**2)
  weight = loss_weight(sigma, sigma_data)
  return weight * loss_simple, {"loss_simple": loss_simple, "weight": weight}


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> np.ndarray:
  """σ_0 = σ_max > ... > σ_{N-1} = σ_min (eq. 5) and σ_N = 0, float32 [N+1]."""
  return np.append(karras_sigmas(sigma_min, sigma_max, num_steps, rho), 0.0).astype(np.float32)


class EDMStepParams(NamedTuple):
  index: jax.Array  # int32 [N].
  sigma: jax.Array  # float32 [N], σ_i.
  sigma_next: jax.Array  # float32 [N], σ_{i+1}.
  sigma_hat: jax.Array  # float32 [N], σ̂_i = (1 + γ_i) σ_i.
  churn_std: jax.Array  # float32 [N], sqrt(σ̂_i² - σ_i²), from float64 (no cancellation).


def churn_levels(sigmas: np.ndarray, s_churn: float, s_min: float,
                 s_max: float) -> tuple[np.ndarray, np.ndarray]:
  """σ̂_i = (1 + γ_i) σ_i with γ_i = min(S_churn / N, √2 - 1) for σ_i ∈ [S_min, S_max], else 0,
  and the churn noise std sqrt(σ̂_i² - σ_i²) = σ_i sqrt(γ_i (2 + γ_i)); float32 [N] each."""
  gamma = min(s_churn / (len(sigmas) - 1), np.sqrt(2.0) - 1.0)
  sigma = sigmas[:-1].astype(np.float64)
  gamma = np.where((sigma >= s_min) & (sigma <= s_max), gamma, 0.0)
  return (sigma * (1.0 + gamma)).astype(np.float32), (sigma * np.sqrt(gamma * (2.0 + gamma))
                                                       ).astype(np.float32)


def _heun_step(denoiser, x, p, noise, final, s_noise):
  """EDM Algorithm 2, lines 4-10: churn x̂ = x + sqrt(σ̂² - σ²) S_noise z, Euler from σ̂ to σ',
  and the 2nd-order correction unless σ' = 0 (the last step)."""
  if noise is not None:
    x = x + p.churn_std * s_noise * noise
  slope = (x - denoiser(x, p.sigma_hat)) / p.sigma_hat
  x_next = x + (p.sigma_next - p.sigma_hat) * slope
  if final:
    return x_next
  slope_next = (x_next - denoiser(x_next, p.sigma_next)) / p.sigma_next
  return x + (p.sigma_next - p.sigma_hat) * 0.5 * (slope + slope_next)


def sample_edm(denoiser: ModelFn, x_T: jax.Array, key: jax.Array, *, num_steps: int = 18,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
               s_noise: float = 1.0, guidance_scale: float | None = None,
               guidance_interval: tuple[float, float] | None = None,
               guidance_rescale: float = 0.0, return_trajectory: bool = False):
  """EDM's sampler (Algorithm 2; Algorithm 1 when S_churn = 0), 2N - 1 denoiser calls.

  Args:
    denoiser: D, `(x [B,...], σ float32 [B]) -> x̂_0 [B,...]` (e.g. `precondition(F)`). With
      `guidance_scale`, called on the doubled batch (see `classifier_free_guidance`), guiding D.
    x_T: [B, ...] standard normal; the sampler starts from x_T · σ_max.
    key: one key or [B] keys (churn noise; see `samplers.sample`).
    num_steps: N >= 2 noise levels (the paper's CIFAR-10 setting is N = 18).
    sigma_min, sigma_max, rho: the σ grid (eq. 5).
    s_churn, s_min, s_max, s_noise: stochasticity (Table 5); S_churn = 0 is deterministic.
    guidance_scale, guidance_interval, guidance_rescale: as `samplers.sample`, the interval in σ.
    return_trajectory: also return x after each step, [N + 1, B, ...] (entry 0 is x_T σ_max).

  Returns:
    Samples [B, ...] float32 (and the trajectory).
  """
  if int(num_steps) != num_steps or num_steps < 2:
    raise ValueError(f"num_steps={num_steps} must be an integer >= 2")
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max} need 0 < sigma_min < sigma_max")
  if s_churn < 0:
    raise ValueError(f"s_churn={s_churn} must be >= 0")
  x_T = jnp.asarray(x_T, jnp.float32)
  if guidance_scale is not None:
    denoiser = classifier_free_guidance(denoiser, guidance_scale, x_T.shape[-1],
                                        interval=guidance_interval, rescale=guidance_rescale)
  sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
  sigma_hat, churn_std = churn_levels(sigmas, s_churn, s_min, s_max)
  params = EDMStepParams(jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(sigmas[:-1]),
                         jnp.asarray(sigmas[1:]), jnp.asarray(sigma_hat), jnp.asarray(churn_std))
  keys = samplers.example_keys(key, x_T.shape[0])

  def denoise(x, sigma):
    return denoiser(x, jnp.full((x.shape[0],), sigma, jnp.float32)).astype(jnp.float32)

  def step(x, p, final):
    noise = samplers.step_noise(keys, p.index, x_T.shape) if s_churn > 0 else None
    return _heun_step(denoise, x, p, noise, final, s_noise)

  x_start = x_T * sigmas[0]
  view = (lambda x, p: x) if return_trajectory else None
  x, frames = samplers.scan_steps(step, params, x_start, view)
  return (x, jnp.concatenate([x_start[None], frames])) if return_trajectory else x
