"""Flow matching on the rectified-flow path, as SD3 (Esser et al. 2024) and SiT (Ma et al. 2024).

Convention (SD3, diffusers' FlowMatch schedulers): t ∈ [0, 1] with t = 0 data and t = 1 noise,
x_t = (1 - t) x_0 + t ε, and the model predicts the velocity v = dx_t/dt = ε - x_0. The model is
fed the float32 timestep t · num_timesteps (diffusers' `timesteps = sigmas * num_train_timesteps`,
1000 by default), so the U-Net and DiT embeddings see the same range as in DDPM training.

The samplers integrate from t = 1 to 0 with the `samplers.scan_steps` driver: `euler`
(FlowMatchEulerDiscreteScheduler), `heun` (FlowMatchHeunDiscreteScheduler: Euler on the last
step) and `euler_maruyama`, the SDE sampler of SiT with diffusion g²(t) = c · t (SiT's `sigma`
form), whose last step is the noiseless mean.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.guidance import classifier_free_guidance
from jaxdiff.diffusion.likelihood import mean_flat
from jaxdiff.diffusion import samplers
from jaxdiff.diffusion.targets import expand

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_METHODS = ("euler", "heun", "euler_maruyama")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x_0 + t ε; x0, noise [B, ...], t [B] or scalar."""
  t = expand(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target v = ε - x_0 [B, ...]."""
  return noise - x0


def x0_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """x_0 = x_t - t v."""
  return x_t - expand(t, x_t) * v


def eps_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """ε = x_t + (1 - t) v."""
  return x_t + (1.0 - expand(t, x_t)) * v


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """t' = s t / (1 + (s - 1) t) (SD3 eq. 23 with α = s; s > 1 spends more time at high noise)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timestep(key: jax.Array, sampling: str = "uniform", *, logit_mean: float = 0.0,
                    logit_std: float = 1.0, mode_scale: float = 1.29) -> jax.Array:
  """One t ∈ (0, 1), float32 scalar (SD3 sec. 3.1): `uniform`; `logit_normal`,
  t = sigmoid(m + s n), n ~ N(0, 1); `mode`, t = 1 - u - s (cos²(π u / 2) - 1 + u), u ~ U(0, 1)."""
  if sampling == "uniform":
    return jax.random.uniform(key, (), jnp.float32)
  if sampling == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (), jnp.float32))
  if sampling == "mode":
    u = jax.random.uniform(key, (), jnp.float32)
    return 1.0 - u - mode_scale * (jnp.cos(jnp.pi / 2 * u)**2 - 1.0 + u)
  raise ValueError(f"sampling={sampling!r} is unknown; choose one of {TIMESTEP_SAMPLINGS}")


def flow_training_inputs(example_keys: jax.Array, x0: jax.Array, *, sampling: str = "uniform",
                         shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                         mode_scale: float = 1.29) -> tuple[jax.Array, jax.Array]:
  """Draws t (see `sample_timestep`, then `shift_timesteps`) and ε ~ N(0, I) per example.

  Args:
    example_keys: [B] keys, one per example.
    x0: [B, ...] the batch (only its shape is used).

  Returns:
    (t float32 [B] in [0, 1], noise float32 [B, ...]); row i depends only on example_keys[i].
  """
  if sampling not in TIMESTEP_SAMPLINGS:
    raise ValueError(f"sampling={sampling!r} is unknown; choose one of {TIMESTEP_SAMPLINGS}")

  def draw(key):
    key_t, key_noise = jax.random.split(key)
    t = sample_timestep(key_t, sampling, logit_mean=logit_mean, logit_std=logit_std,
                        mode_scale=mode_scale)
    return shift_timesteps(t, shift), jax.random.normal(key_noise, x0.shape[1:], jnp.float32)

  return jax.vmap(draw)(example_keys)


def flow_matching_loss(model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
                       num_timesteps: int = 1000) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example conditional flow-matching loss mean ‖v̂(x_t, t) - (ε - x_0)‖² (Lipman et al. 2023).

  Args:
    model_fn: `(x_t [B,...,C], t float32 [B]) -> v̂ [B,...,C]`, fed t · num_timesteps.
    x0: [B, ..., C] data; t: [B] in [0, 1]; noise: [B, ..., C] ε.

  Returns:
    (loss [B] float32, aux with aux["x_t"]).
  """
  x_t = interpolate(x0, noise, t)
  prediction = model_fn(x_t, t.astype(jnp.float32) * num_timesteps).astype(jnp.float32)
  return mean_flat((prediction - velocity(x0, noise))**2), {"x_t": x_t}


def flow_sigmas(num_steps: int, shift: float = 1.0, num_timesteps: int = 1000) -> np.ndarray:
  """The noise levels t_0 = 1 > ... > t_{n-1}, t_n = 0, float32 [n+1], as diffusers' FlowMatch
  schedulers: linspace(1, shift(1/T), n), shifted (again), then 0 appended."""
  last = shift_timesteps(1.0 / num_timesteps, shift)
  grid = shift_timesteps(np.linspace(1.0, last, num_steps), shift)
  return np.append(grid, 0.0).astype(np.float32)


class FlowStepParams(NamedTuple):
  index: jax.Array  # int32 [n].
  sigma: jax.Array  # float32 [n], t_k.
  sigma_next: jax.Array  # float32 [n], t_{k+1}.


def _euler(velocity_fn, x, p, noise, final, diffusion_scale):
  del noise, final, diffusion_scale
  return x + (p.sigma_next - p.sigma) * velocity_fn(x, p.sigma)


def _heun(velocity_fn, x, p, noise, final, diffusion_scale):
  del noise, diffusion_scale
  v = velocity_fn(x, p.sigma)
  x_euler = x + (p.sigma_next - p.sigma) * v
  if final:
    return x_euler
  return x + (p.sigma_next - p.sigma) * 0.5 * (v + velocity_fn(x_euler, p.sigma_next))


def _euler_maruyama(velocity_fn, x, p, noise, final, diffusion_scale):
  """Reverse SDE dx = [v - ½ g² ∇log p] dt + g dW̄ with g² = c t and ∇log p = -ε̂ / t, so
  ½ g² ∇log p = -½ c (x + (1 - t) v); x' = x + drift (t' - t) + sqrt(c t (t - t')) z."""
  del final
  v = velocity_fn(x, p.sigma)
  drift = v + 0.5 * diffusion_scale * eps_from_velocity(x, v, p.sigma)
  x = x + (p.sigma_next - p.sigma) * drift
  if noise is not None:
    x = x + jnp.sqrt(diffusion_scale * p.sigma * (p.sigma - p.sigma_next)) * noise
  return x


_STEPS = {"euler": _euler, "heun": _heun, "euler_maruyama": _euler_maruyama}


def sample_flow(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *, num_steps: int,
                method: str = "euler", shift: float = 1.0, num_timesteps: int = 1000,
                diffusion_scale: float = 1.0, guidance_scale: float | None = None,
                guidance_interval: tuple[float, float] | None = None,
                guidance_rescale: float = 0.0, return_trajectory: bool = False):
  """Integrates a velocity model from t = 1 (x_T ~ N(0, I)) to t = 0.

  Args:
    model_fn: `(x [B,...,C], t float32 [B]) -> v̂ [B,...,C]`, t = noise level · num_timesteps.
      With `guidance_scale`, called on the doubled batch (see `classifier_free_guidance`).
    x_T: [B, ...] standard normal.
    key: one key or [B] keys (noise of `euler_maruyama`; see `samplers.sample`).
    num_steps: n >= 1 (`heun` calls the model 2n - 1 times).
    method: one of `FLOW_METHODS`.
    shift: timestep shift s (SD3 uses 3.0).
    num_timesteps: the model's timestep scale (diffusers' num_train_timesteps).
    diffusion_scale: c in g²(t) = c t (`euler_maruyama` only).
    guidance_scale, guidance_interval, guidance_rescale: as `samplers.sample`; the interval is in
      the model's timesteps (t · num_timesteps).
    return_trajectory: also return x after each step, [n + 1, B, ...] (entry 0 is x_T).

  Returns:
    Samples [B, ...] float32 (and the trajectory).
  """
  if method not in FLOW_METHODS:
    raise ValueError(f"method={method!r} is unknown; choose one of {FLOW_METHODS}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be an integer >= 1")
  if shift <= 0:
    raise ValueError(f"shift={shift} must be > 0")
  x_T = jnp.asarray(x_T, jnp.float32)
  if guidance_scale is not None:
    model_fn = classifier_free_guidance(model_fn, guidance_scale, x_T.shape[-1],
                                        interval=guidance_interval, rescale=guidance_rescale)
  sigmas = flow_sigmas(num_steps, shift, num_timesteps)
  params = FlowStepParams(jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(sigmas[:-1]),
                          jnp.asarray(sigmas[1:]))
  keys = samplers.example_keys(key, x_T.shape[0])
  stochastic = method == "euler_maruyama" and diffusion_scale > 0

  def velocity_fn(x, sigma):
    t = jnp.full((x.shape[0],), sigma * num_timesteps, jnp.float32)
    return model_fn(x, t).astype(jnp.float32)

  def step(x, p, final):
    noise = samplers.step_noise(keys, p.index, x_T.shape) if stochastic and not final else None
    return _STEPS[method](velocity_fn, x, p, noise, final, diffusion_scale)

  view = (lambda x, p: x) if return_trajectory else None
  x, frames = samplers.scan_steps(step, params, x_T, view)
  return (x, jnp.concatenate([x_T[None], frames])) if return_trajectory else x
