"""Noise schedules: beta tables computed once in float64 NumPy, stored as float32 pytrees.

Conventions: timesteps are indexed t = 0..T-1 in code (the papers' 1..T). `alphas_cumprod[t]` is
ᾱ_t of Ho et al. (2020), so x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = (
    "linear", "scaled_linear", "cosine", "sigmoid", "quadratic", "exponential", "constant")

# Default beta ranges. `scaled_linear` defaults to Stable Diffusion's range (diffusers' default for
# the name is DDPM's 1e-4 → 0.02, so pass beta_start/beta_end explicitly to reproduce that).
_DEFAULT_BETA_RANGE = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
    "quadratic": (1e-4, 0.02),
    "constant": (1e-4, 0.02),
}


@flax.struct.dataclass
class Schedule:
  """Tables of a discrete variance-preserving diffusion, each float32 [T].

  Attributes:
    betas: β_t.
    alphas: α_t = 1 - β_t.
    alphas_cumprod: ᾱ_t = prod_{s<=t} α_s.
    alphas_cumprod_prev: ᾱ_{t-1}, with ᾱ_{-1} = 1.
    sqrt_alphas_cumprod: sqrt(ᾱ_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - ᾱ_t).
    posterior_variance: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) (Ho et al. eq. 7); 0 at t = 0.
    posterior_log_variance_clipped: log β̃_t with the t = 0 entry replaced by the t = 1 one
      (as ADM does, since log 0 = -inf).
    posterior_mean_coef1: coefficient of x_0 in μ̃_t(x_t, x_0) (eq. 7).
    posterior_mean_coef2: coefficient of x_t in μ̃_t(x_t, x_0).
    num_timesteps: T (static).
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  num_timesteps: int = flax.struct.field(pytree_node=False)


def _betas_from_alpha_bar(alpha_bar_fn, num_timesteps: int, max_beta: float) -> np.ndarray:
  """β_t = min(1 - ᾱ(t+1/T) / ᾱ(t/T), max_beta) (Nichol & Dhariwal 2021, eq. 17)."""
  grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = alpha_bar_fn(grid)
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _beta_table(name: str, num_timesteps: int, beta_start: float, beta_end: float,
                cosine_s: float, max_beta: float) -> np.ndarray:
  """Float64 betas [T] for a named schedule."""
  if name == "linear":  # Ho et al. 2020.
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if name in ("scaled_linear", "quadratic"):  # Linspace of square roots, squared.
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  if name == "sigmoid":  # GeoDiff (Xu et al. 2022).
    ramp = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-ramp)) * (beta_end - beta_start) + beta_start
  if name == "constant":
    return np.full((num_timesteps,), beta_end, dtype=np.float64)
  if name == "cosine":  # Improved DDPM: ᾱ(u) = cos²((u + s) / (1 + s) · π/2).
    return _betas_from_alpha_bar(
        lambda u: np.cos((u + cosine_s) / (1.0 + cosine_s) * math.pi / 2)**2,
        num_timesteps, max_beta)
  if name == "exponential":  # ᾱ(u) = exp(-12 u), diffusers' "exp" alpha-bar transform.
    return _betas_from_alpha_bar(lambda u: np.exp(-12.0 * u), num_timesteps, max_beta)
  raise ValueError(f"name={name!r} is unknown; choose one of {SCHEDULE_NAMES}")


def rescale_betas_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts and scales sqrt(ᾱ_t) so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged (Lin et al. 2024, Alg. 1).

  Args:
    betas: [T] float64.

  Returns:
    [T] float64 betas with β_{T-1} = 1. With ᾱ_{T-1} = 0 an ε-prediction model cannot recover
    x_0 at the last step; train with v-prediction.
  """
  sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
  sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
  alpha_bar = sqrt_alpha_bar**2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return 1.0 - alphas


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Builds every table from float64 betas [T] (T >= 2), then stores them as float32."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas = 1.0 - betas
  alpha_bar = np.cumprod(alphas)
  alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
  with np.errstate(divide="ignore", invalid="ignore"):
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    coef1 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
    coef2 = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar)
  log_variance_clipped = np.log(np.concatenate([posterior_variance[1:2], posterior_variance[1:]]))
  tables = dict(
      betas=betas, alphas=alphas, alphas_cumprod=alpha_bar, alphas_cumprod_prev=alpha_bar_prev,
      sqrt_alphas_cumprod=np.sqrt(alpha_bar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alpha_bar),
      posterior_variance=posterior_variance, posterior_log_variance_clipped=log_variance_clipped,
      posterior_mean_coef1=coef1, posterior_mean_coef2=coef2)
  tables = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()}
  return Schedule(num_timesteps=int(betas.shape[0]), **tables)


def make_schedule(name: str, num_timesteps: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None, cosine_s: float = 0.008, max_beta: float = 0.999,
                  rescale_zero_terminal_snr: bool = False) -> Schedule:
  """Makes a named noise schedule.

  Args:
    name: one of `SCHEDULE_NAMES`. `linear`: DDPM's linspace(β_start, β_end). `scaled_linear` and
      `quadratic`: linspace(sqrt β_start, sqrt β_end)² (defaults: Stable Diffusion's 0.00085 →
      0.012 and DDPM's 1e-4 → 0.02 respectively). `cosine`: Improved DDPM with offset `cosine_s`,
      betas clipped at `max_beta`. `sigmoid`: GeoDiff. `exponential`: ᾱ(u) = exp(-12u).
      `constant`: β_t = beta_end.
    num_timesteps: T >= 2. The beta range is not rescaled with T (diffusers' convention).
    beta_start: first beta (linear-type schedules); None uses the name's default.
    beta_end: last beta; None uses the name's default.
    cosine_s: offset s of the cosine schedule.
    max_beta: clip of the alpha-bar schedules (cosine, exponential).
    rescale_zero_terminal_snr: rescale to ᾱ_{T-1} = 0 (Lin et al. 2024).

  Returns:
    A `Schedule` of float32 [T] tables computed in float64.

  Raises:
    ValueError: unknown `name` or `num_timesteps` < 2.
  """
  if name not in SCHEDULE_NAMES:
    raise ValueError(f"name={name!r} is unknown; choose one of {SCHEDULE_NAMES}")
  if int(num_timesteps) != num_timesteps or num_timesteps < 2:
    raise ValueError(f"num_timesteps={num_timesteps} must be an integer >= 2")
  default_start, default_end = _DEFAULT_BETA_RANGE.get(name, (None, None))
  betas = _beta_table(
      name, int(num_timesteps), default_start if beta_start is None else beta_start,
      default_end if beta_end is None else beta_end, cosine_s, max_beta)
  if rescale_zero_terminal_snr:
    betas = rescale_betas_zero_terminal_snr(betas)
  return schedule_from_betas(betas)


SPACINGS = ("leading", "linspace", "trailing")
# How a diffusers scheduler family lays out the same spacing name (see `timesteps`).
GRID_CONVENTIONS = ("ddim", "multistep", "sigma")


def timesteps(schedule: Schedule, num_steps: int, spacing: str = "leading",
              steps_offset: int = 0, convention: str = "ddim") -> np.ndarray:
  """The descending grid of timesteps a sampler visits (diffusers' `timestep_spacing`).

  With T = schedule.num_timesteps and n = num_steps (Lin et al. 2024, Table 2), per `convention`
  (the same spacing name means different grids in different diffusers schedulers):

  `ddim` (DDIMScheduler, DDPMScheduler), int32:
    `leading`: k · (T // n) + steps_offset for k = n-1..0 (T=1000, n=50: 980, 960, ..., 0);
    `linspace`: round(linspace(0, T-1, n)) reversed (999, ..., 0);
    `trailing`: round(T - k · T/n) - 1 for k = 0..n-1 (999, 979, ..., 19).
  `multistep` (DPMSolverMultistepScheduler, UniPCMultistepScheduler), int32: n + 1 points with the
    last (t = 0) dropped, so the model is never evaluated at t = 0:
    `leading`: k · (T // (n+1)) + steps_offset for k = n..1; `linspace`: round(linspace(0, T-1,
    n+1)) reversed without its last entry; `trailing` as `ddim`.
  `sigma` (Euler, Euler ancestral, Heun), float32: `linspace` is linspace(0, T-1, n) reversed,
    unrounded (fractional timesteps); `leading` and `trailing` as `ddim`.

  Args:
    schedule: the schedule (only T is used).
    num_steps: n, 1 <= n <= T.
    spacing: one of `SPACINGS`.
    steps_offset: added to the `leading` grid (Stable Diffusion uses 1).
    convention: one of `GRID_CONVENTIONS`.

  Returns:
    [n] NumPy array, descending, in [0, T-1]: int32, or float32 for `sigma`.

  Raises:
    ValueError: bad `num_steps`, unknown `spacing` or `convention`.
  """
  total = schedule.num_timesteps
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be an integer >= 1")
  if num_steps > total:
    raise ValueError(f"num_steps={num_steps} exceeds schedule.num_timesteps={total}")
  if convention not in GRID_CONVENTIONS:
    raise ValueError(f"convention={convention!r} is unknown; choose one of {GRID_CONVENTIONS}")
  points = num_steps + 1 if convention == "multistep" else num_steps
  if spacing == "leading":
    grid = (np.arange(points)[::-1] * (total // points) + steps_offset)[:num_steps]
  elif spacing == "linspace" and convention == "sigma":
    grid = np.linspace(0, total - 1, num_steps, dtype=np.float32)[::-1]
  elif spacing == "linspace":
    grid = np.linspace(0, total - 1, points).round()[::-1][:num_steps]
  elif spacing == "trailing":
    grid = (np.round(np.arange(total, 0, -total / num_steps)) - 1)[:num_steps]
  else:
    raise ValueError(f"spacing={spacing!r} is unknown; choose one of {SPACINGS}")
  grid = grid.astype(np.float32 if convention == "sigma" else np.int32)
  if grid.max() >= total or grid.min() < 0:
    raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {total - 1}]")
  return grid


def sigma_table(schedule: Schedule) -> np.ndarray:
  """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) [T] in float64, from the stored float32 ᾱ (as diffusers' sigma
  schedulers build it), so that x_t / sqrt(ᾱ_t) = x_0 + σ_t ε."""
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_to_timestep(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Fractional timesteps of `sigmas` [n]: linear interpolation of log σ in `table` [T]
  (diffusers' `_sigma_to_t`; clipped to [0, T-1])."""
  log_table = np.log(table)
  log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
  low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
  weight = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
  return (1.0 - weight) * low + weight * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                  rho: float = 7.0) -> np.ndarray:
  """σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i = 0..n-1 (Karras et al. 2022,
  eq. 5), float64 [n], descending."""
  ramp = np.linspace(0.0, 1.0, num_steps)
  inverse_min, inverse_max = sigma_min**(1.0 / rho), sigma_max**(1.0 / rho)
  return (inverse_max + ramp * (inverse_min - inverse_max))**rho
