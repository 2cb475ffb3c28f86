"""Samplers: one step function per method, driven by a single `lax.scan` over the step tables.

Every method reproduces one diffusers scheduler with that scheduler's grid conventions (see
`sampler_tables` and `schedules.timesteps`):

| method            | diffusers scheduler                 | default spacing | family    |
|-------------------|-------------------------------------|-----------------|-----------|
| `ddpm`            | DDPMScheduler                       | leading         | ddim      |
| `ddim`            | DDIMScheduler                       | leading         | ddim      |
| `dpmpp_2m`        | DPMSolverMultistepScheduler (2M)    | linspace        | multistep |
| `unipc`           | UniPCMultistepScheduler (bh2)       | linspace        | multistep |
| `euler`           | EulerDiscreteScheduler              | linspace        | sigma     |
| `euler_ancestral` | EulerAncestralDiscreteScheduler     | linspace        | sigma     |
| `heun`            | HeunDiscreteScheduler               | linspace        | sigma     |

The model always receives float32 timesteps [B]; σ-space methods (family `sigma`) may pass
fractional ones, interpolated from the σ table as diffusers does. `sample` takes standard-normal
x_T for every method; σ-space methods scale it by diffusers' `init_noise_sigma` and carry
y = x / sqrt(ᾱ), which `sample` maps back to the VP scale in the trajectory.

`scan_steps` is the one driver (also used by `flow` and `edm`): the first n-1 steps run in a
`lax.scan` with a fixed-shape carry; the last step is the same step function specialised at
trace time (`final=True`), so nothing on the hot path branches with `lax.cond` and nothing leaves
the device. Per-step tables are computed on the host in float64 from the concrete schedule, so
the schedule must not be a traced jit argument (close over it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import sampler_tables, sigma_steps, targets, vp_steps
from jaxdiff.diffusion.guidance import classifier_free_guidance
from jaxdiff.diffusion.keys import per_example_keys
from jaxdiff.diffusion.schedules import Schedule, SPACINGS

METHODS = tuple(sampler_tables.FAMILIES)
VARIANCES = ("fixed_small", "fixed_large", "learned")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The trace-time options a step function reads, resolved by `sample` from its arguments
  (users choose sampler options through `sample`'s keywords or `SamplerSettings`)."""
  method: str = "ddim"
  prediction: str = "eps"
  eta: float = 0.0
  variance: str = "fixed_small"
  clip_denoised: bool = False
  use_clipped_model_output: bool = True


class StepParams(NamedTuple):
  """Per-step values, stacked to [n, ...] arrays for the scan (unused fields are zeros)."""
  index: jax.Array  # int32, step number k (folded into the noise keys).
  t: jax.Array  # float32, timestep fed to the model at step k.
  t_next: jax.Array  # float32, timestep of the second model call (heun).
  alpha_bar: jax.Array  # float32, ᾱ at step k (VP methods).
  alpha_bar_next: jax.Array  # float32, ᾱ where the step lands.
  sigma: jax.Array  # float32, σ_k (σ-space methods).
  sigma_next: jax.Array  # float32, σ_{k+1}.
  coefficients: jax.Array  # float32 [2, 6], multistep weights (see `vp_steps.multistep_step`).


class SamplerState(NamedTuple):
  """The scan carry: x [B, ...] (y for σ-space methods), the last x̂_0 predictions
  [H, B, ...] and the corrected previous sample [B, ...] (multistep methods; H = 0 otherwise)."""
  x: jax.Array
  history: jax.Array
  previous_x: jax.Array


def initial_state(method: str, x: jax.Array) -> SamplerState:
  """The carry at k = 0; only multistep methods hold a history."""
  multistep = sampler_tables.FAMILIES[method] == "multistep"
  size = sampler_tables.NUM_TERMS - 3 if multistep else 0
  return SamplerState(x, jnp.zeros((size,) + x.shape, x.dtype),
                      x if multistep else jnp.zeros((0,), x.dtype))


def step_params(tables: dict[str, np.ndarray]) -> StepParams:
  """Stacks host tables (from `sampler_tables`) into StepParams [n]; missing fields are zeros."""
  num_steps = len(tables["t"])
  zeros = np.zeros(num_steps, np.float32)
  fields = {name: jnp.asarray(tables.get(name, zeros))
            for name in StepParams._fields if name not in ("index", "coefficients")}
  coefficients = tables.get("coefficients", np.zeros((num_steps, 2, 0), np.float32))
  return StepParams(index=jnp.arange(num_steps, dtype=jnp.int32),
                    coefficients=jnp.asarray(coefficients), **fields)


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """Per-example keys [B]: `key` itself if it already holds B keys, else fold_in(key, i)."""
  is_typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (1 if is_typed else 2):
    if key.shape[0] != batch_size:
      raise ValueError(f"key holds {key.shape[0]} keys but x_T has batch size {batch_size}")
    return key
  return per_example_keys(key, jnp.arange(batch_size))


def step_noise(keys: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal noise [B, ...] of step `index`; row i comes only from keys[i]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:]))(keys)


_STEPS = {"ddpm": vp_steps.ddpm_step, "ddim": vp_steps.ddim_step,
          "dpmpp_2m": vp_steps.multistep_step, "unipc": vp_steps.multistep_step,
          "euler": sigma_steps.euler_step, "euler_ancestral": sigma_steps.euler_ancestral_step,
          "heun": sigma_steps.heun_step}


def needs_noise(config: StepOptions, final: bool) -> bool:
  """Whether a step draws noise (decided at trace time)."""
  if config.method in ("ddpm", "euler_ancestral"):
    return not final  # Both add no noise on the last step (σ' = 0 for Euler ancestral).
  return config.method == "ddim" and config.eta > 0


def sampler_step(model_fn: ModelFn, config: StepOptions, state: SamplerState, params: StepParams,
                 noise: jax.Array | None, *, final: bool) -> SamplerState:
  """One step of `config.method` from grid entry k to k+1.

  Args:
    model_fn: `(x [B,...], t float32 [B]) -> prediction [B,...,C or 2C]`.
    config: static options.
    state: the carry at step k.
    params: the values of step k (one slice of `step_params`).
    noise: [B, ...] standard normal, or None when `needs_noise` is False.
    final: whether this is the last step (static).

  Returns:
    The carry at step k+1.
  """
  return _STEPS[config.method](model_fn, config, state, params, noise, final)


def scan_steps(step: Callable, params, state, view: Callable | None = None):
  """The one sampler driver: `step(state, p, final)` over the leading axis of `params` [n].

  Args:
    step: `(carry, params of one step, final: bool static) -> carry`.
    params: a pytree of [n, ...] arrays (its first n-1 slices run in a `lax.scan`).
    state: the initial carry (fixed shapes).
    view: optional `(carry, params of one step) -> frame` recorded after every step.

  Returns:
    (final carry, frames [n, ...] or None).
  """
  def body(carry, p):
    carry = step(carry, p, False)
    return carry, (view(carry, p) if view is not None else None)

  head = jax.tree.map(lambda a: a[:-1], params)
  last = jax.tree.map(lambda a: a[-1], params)
  state, frames = jax.lax.scan(body, state, head)
  state = step(state, last, True)
  if view is not None:
    frames = jnp.concatenate([frames, view(state, last)[None]])
  return state, frames


def _validate(schedule, method, num_steps, eta, prediction, variance, spacing, karras,
              final_sigmas_type, solver_order):
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be an integer >= 1")
  if num_steps > schedule.num_timesteps:
    raise ValueError(
        f"num_steps={num_steps} exceeds schedule.num_timesteps={schedule.num_timesteps}")
  if eta < 0:
    raise ValueError(f"eta={eta} must be >= 0")
  targets.check_prediction(prediction)
  if variance not in VARIANCES:
    raise ValueError(f"variance={variance!r} is unknown; choose one of {VARIANCES}")
  if spacing is not None and spacing not in SPACINGS:
    raise ValueError(f"spacing={spacing!r} is unknown; choose one of {SPACINGS}")
  if karras and method not in sampler_tables.KARRAS_METHODS:
    raise ValueError(f"karras_sigmas=True is not available for method={method!r}; use one of "
                     f"{sampler_tables.KARRAS_METHODS}")
  if final_sigmas_type not in sampler_tables.FINAL_SIGMAS_TYPES:
    raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is unknown; choose one of "
                     f"{sampler_tables.FINAL_SIGMAS_TYPES}")
  if final_sigmas_type != "zero" and method not in sampler_tables.FINAL_SIGMA_METHODS:
    raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not available for "
                     f"method={method!r}; use one of {sampler_tables.FINAL_SIGMA_METHODS}")
  allowed_orders = {"unipc": (1, 2, 3), "dpmpp_2m": (2,)}.get(method, (2,))
  if solver_order not in allowed_orders:
    raise ValueError(f"solver_order={solver_order} is not available for method={method!r}; "
                     f"choose one of {allowed_orders}")


def sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, key: jax.Array, *,
           method: str, num_steps: int, eta: float = 0.0, spacing: str | None = None,
           prediction: str = "eps", clip_denoised: bool = False,
           guidance_scale: float | None = None, variance: str = "fixed_small",
           set_alpha_to_one: bool = True, return_trajectory: bool = False,
           steps_offset: int = 0, karras_sigmas: bool = False, final_sigmas_type: str = "zero",
           solver_order: int = 2, use_clipped_model_output: bool = True,
           guidance_interval: tuple[float, float] | None = None, guidance_rescale: float = 0.0):
  """Draws samples by integrating the reverse process from x_T.

  Args:
    model_fn: `(x_t [B,...,C], t float32 [B]) -> [B,...,C]` prediction of type `prediction`, or
      `[B,...,2C]` with learned-variance channels (used by `ddpm` with `variance="learned"`,
      ignored otherwise). t is float32 and fractional for σ-space methods with `linspace` spacing
      or Karras σ. Any output dtype; the sampler computes in float32. With `guidance_scale`,
      `model_fn` is called on the doubled batch `[x; x]`, `[t; t]` and must evaluate the first
      half with the labels and the second half with the null label (see
      `classifier_free_guidance`).
    schedule: the training schedule (concrete, not a traced argument).
    x_T: [B, ...] standard normal noise (σ-space methods scale it by `init_noise_sigma`).
    key: one PRNG key, or per-example keys [B]. The noise of example i at step k is drawn from
      fold_in(key_i, k) (key_i = fold_in(key, i) for a single key), so it does not depend on the
      batch composition or device count.
    method: one of `METHODS` (see the module docstring for the diffusers scheduler each follows).
    num_steps: n, the number of steps, 1 <= n <= T (`heun` calls the model 2n - 1 times).
    eta: DDIM noise scale (0: deterministic, 1: DDPM-like); only used by `ddim`.
    spacing: `leading | linspace | trailing` in the convention of the method's diffusers
      scheduler (see `schedules.timesteps`); None: that scheduler's default.
    prediction: `eps | x0 | v`.
    clip_denoised: clip the predicted x_0 to [-1, 1] at every step (diffusers' `clip_sample`).
    guidance_scale: classifier-free guidance scale s (None: no guidance).
    variance: `fixed_small` (β̃), `fixed_large` (β) or `learned`; only used by `ddpm`.
    set_alpha_to_one: `ddpm`/`ddim`: after the grid land on ᾱ = 1 (True, returns x̂_0 with eta = 0)
      or on ᾱ_0 (False).
    return_trajectory: also return the states.
    steps_offset: added to `leading` grids (Stable Diffusion's configs use 1).
    karras_sigmas: Karras et al. (2022) σ with ρ = 7 (diffusers' `use_karras_sigmas`).
    final_sigmas_type: `zero` or `sigma_min`, σ after the grid (`dpmpp_2m`, `unipc`, `euler`).
    solver_order: UniPC order 1-3 (`dpmpp_2m` is order 2).
    use_clipped_model_output: with `clip_denoised`, `ddim` re-derives ε from the clipped x_0 (True,
      as ADM) or keeps the model's ε (False, diffusers' DDIMScheduler.step default).
    guidance_interval: (t_low, t_high): guide only where t_low <= t <= t_high (model timesteps).
    guidance_rescale: φ of CFG rescale (Lin et al. 2024); 0 is off.

  Returns:
    Samples [B, ...] float32, and with `return_trajectory` a trajectory [n + 1, B, ...] whose
    entry k is x after k steps on the VP scale (σ-space y divided by sqrt(σ² + 1)); entry 0 is
    x_T times `init_noise_sigma` / sqrt(σ_0² + 1) for σ-space methods, else x_T.

  Raises:
    ValueError: naming the first bad argument.
  """
  _validate(schedule, method, num_steps, eta, prediction, variance, spacing, karras_sigmas,
            final_sigmas_type, solver_order)
  x_T = jnp.asarray(x_T, jnp.float32)
  if guidance_scale is not None:
    model_fn = classifier_free_guidance(model_fn, guidance_scale, x_T.shape[-1],
                                        interval=guidance_interval, rescale=guidance_rescale)
  elif guidance_interval is not None or guidance_rescale:
    raise ValueError("guidance_interval and guidance_rescale need a guidance_scale")
  spacing = sampler_tables.DEFAULT_SPACINGS[method] if spacing is None else spacing
  tables = sampler_tables.method_tables(
      schedule, method, num_steps, spacing, steps_offset=steps_offset,
      set_alpha_to_one=set_alpha_to_one, karras=karras_sigmas,
      final_sigmas_type=final_sigmas_type, solver_order=solver_order)
  params = step_params(tables)
  config = StepOptions(method=method, prediction=prediction, eta=float(eta), variance=variance,
                         clip_denoised=clip_denoised,
                         use_clipped_model_output=use_clipped_model_output)
  keys = example_keys(key, x_T.shape[0])
  x_start = x_T * jnp.float32(tables.get("init_scale", 1.0))
  x, frames = _integrate(model_fn, config, return_trajectory, params, x_start, keys)
  return (x, frames) if return_trajectory else x


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _integrate(model_fn, config, return_trajectory, params, x_start, keys):
  """Runs the steps; jitted with the tables as arguments, so grids of one length share a trace.

  The jit cache is keyed by `model_fn`'s identity: a module-level model function reuses compiled
  code across calls, a fresh closure per call recompiles (and stays referenced by the cache until
  evicted). Inside an outer jit (jaxdiff.sampling) this only inlines.
  """
  sigma_space = sampler_tables.FAMILIES[config.method] == "sigma"

  def step(carry, p, final):
    noise = step_noise(keys, p.index, x_start.shape) if needs_noise(config, final) else None
    return sampler_step(model_fn, config, carry, p, noise, final=final)

  def view(carry, p):
    return carry.x / jnp.sqrt(p.sigma_next**2 + 1.0) if sigma_space else carry.x

  state, frames = scan_steps(step, params, initial_state(config.method, x_start),
                             view if return_trajectory else None)
  if not return_trajectory:
    return state.x, None
  first = x_start / jnp.sqrt(params.sigma[0]**2 + 1.0) if sigma_space else x_start
  return state.x, jnp.concatenate([first[None], frames])
