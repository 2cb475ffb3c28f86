"""Per-step sampler tables, computed once on the host in float64 NumPy and stored as float32.

Each method belongs to a family whose grid follows one diffusers scheduler family (see
`schedules.timesteps`):
- `ddim` (`ddpm`, `ddim`): integer timesteps, ᾱ read from the schedule.
- `multistep` (`dpmpp_2m`, `unipc`): integer timesteps, σ_k = sqrt((1 - ᾱ) / ᾱ) at the grid (or
  Karras σ with rounded timesteps), plus σ_n = 0 (`final_sigmas_type="zero"`) or σ at t = 0.
  Both solvers are linear multistep methods in data-prediction form, so each step is a fixed
  linear combination of the current sample, the previous sample and the last x̂_0 predictions; the
  weights of step k are rows of `coefficients` (see `multistep_coefficients`).
- `sigma` (`euler`, `euler_ancestral`, `heun`): fractional timesteps, σ interpolated linearly in t
  from the σ table (or Karras σ with timesteps interpolated in log σ), as diffusers does.
"""
from __future__ import annotations

import numpy as np

from jaxdiff.diffusion.schedules import (Schedule, karras_sigmas, sigma_table, sigma_to_timestep,
                                         timesteps)

FAMILIES = {"ddpm": "ddim", "ddim": "ddim", "dpmpp_2m": "multistep", "unipc": "multistep",
            "euler": "sigma", "euler_ancestral": "sigma", "heun": "sigma"}
# The `timestep_spacing` default of each method's diffusers scheduler.
DEFAULT_SPACINGS = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace",
                    "unipc": "linspace", "euler": "linspace", "euler_ancestral": "linspace",
                    "heun": "linspace"}
KARRAS_METHODS = ("dpmpp_2m", "unipc", "euler", "heun")
FINAL_SIGMA_METHODS = ("dpmpp_2m", "unipc", "euler")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# Row layout of `coefficients[k, row]`: weights of (x_k, x_{k-1}, x̂_0 at k, k-1, k-2, k-3).
NUM_TERMS = 6


def _float32(values) -> np.ndarray:
  return np.asarray(values, np.float32)


def ddim_tables(schedule: Schedule, method: str, grid: np.ndarray,
                set_alpha_to_one: bool) -> dict[str, np.ndarray]:
  """ᾱ at each grid entry and where each step lands: the next grid entry (ddpm, as diffusers'
  DDPMScheduler) or t - T // n (ddim, as DDIMScheduler, which differs from the grid for linspace
  spacing); ᾱ = 1 (`set_alpha_to_one`) or ᾱ_0 after the grid."""
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float64)
  final = 1.0 if set_alpha_to_one else alpha_bar[0]
  if method == "ddim":
    landing = grid.astype(np.int64) - schedule.num_timesteps // len(grid)
  else:
    landing = np.append(grid[1:], -1).astype(np.int64)
  alpha_bar_next = np.where(landing >= 0, alpha_bar[np.maximum(landing, 0)], final)
  return dict(t=_float32(grid), alpha_bar=_float32(alpha_bar[grid]),
              alpha_bar_next=_float32(alpha_bar_next))


def _step_constants(sigmas: np.ndarray):
  """α, σ_VP = σ α and λ = log(α / σ_VP) = -log σ for EDM-form σ [n+1] (inf where σ = 0)."""
  with np.errstate(divide="ignore"):
    alpha = 1.0 / np.sqrt(sigmas**2 + 1.0)
    return alpha, sigmas * alpha, -np.log(sigmas)


def _phi_weights(hh: float, order: int) -> np.ndarray:
  """b_i = h φ_{i+1}(hh) i! / B(h), i = 0..order-1, with B(h) = e^{hh} - 1 (UniPC's bh2)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    weights, factorial = [], 1
    for i in range(1, order + 1):
      weights.append(h_phi_k * factorial / h_phi_1)
      factorial *= i + 1
      h_phi_k = h_phi_k / hh - 1.0 / factorial
  return np.asarray(weights)


def _unipc_row(alpha, sigma_vp, lam, source: int, target: int, order: int,
               corrector: bool) -> np.ndarray:
  """UniPC-p / UniC-p (Zhao et al. 2023, Alg. 2 and 3; bh2) from node `source` to `target`.

  x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m_s - α_t B(h) Σ_i ρ_i (m_{s-i} - m_s) / r_i
  [- α_t B(h) ρ_p (m_t - m_s) for the corrector], r_i = (λ_{s-i} - λ_s) / h, h = λ_t - λ_s.
  The row holds weights of (x_target?, x_source, m_target, m_source, m_{source-1}, ...) in the
  `NUM_TERMS` layout relative to `target` (the corrector) or to `source` (the predictor).
  """
  row = np.zeros(NUM_TERMS)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = lam[target] - lam[source]
    ratios = np.array([(lam[source - i] - lam[source]) / h for i in range(1, order)] + [1.0])
    hh = -h
    h_phi_1 = np.expm1(hh)
    scale = alpha[target] * h_phi_1  # α_t B(h) with bh2's B(h) = e^{-h} - 1.
    weights = _phi_weights(hh, order)
    powers = np.stack([ratios**i for i in range(order)])
    if corrector:
      rhos = np.array([0.5]) if order == 1 else np.linalg.solve(powers, weights)
    elif order == 1:
      rhos = np.zeros(0)
    else:
      rhos = np.array([0.5]) if order == 2 else np.linalg.solve(powers[:-1, :-1], weights[:-1])
  # Corrector rows are indexed from the target k (x_{k-1} in slot 1, m_k in 2, m_{k-1} in 3...);
  # predictor rows from the source k (x_k in 0, m_k in 2, m_{k-1} in 3, ...).
  x_slot, m_slot = (1, 3) if corrector else (0, 2)
  row[x_slot] = sigma_vp[target] / sigma_vp[source] if sigma_vp[source] > 0 else 0.0
  row[m_slot] = -h_phi_1 * alpha[target]
  for i in range(1, order):
    weight = scale * rhos[i - 1] / ratios[i - 1]
    row[m_slot + i] -= weight
    row[m_slot] += weight
  if corrector:
    row[2] -= scale * rhos[-1]
    row[m_slot] += scale * rhos[-1]
  return row


def _dpmpp_2m_row(alpha, sigma_vp, lam, k: int, second_order: bool) -> np.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) from node k to k+1:
  x' = (σ'/σ) x - α' (e^{-h} - 1) (m_k + (m_k - m_{k-1}) / (2 r)), r = h_{k-1} / h."""
  row = np.zeros(NUM_TERMS)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = lam[k + 1] - lam[k]
    step = -alpha[k + 1] * np.expm1(-h)
    row[0] = sigma_vp[k + 1] / sigma_vp[k]
    row[2] = step
    if second_order:
      half_inverse_ratio = 0.5 * h / (lam[k] - lam[k - 1])
      row[2] += step * half_inverse_ratio
      row[3] = -step * half_inverse_ratio
  return row


def multistep_coefficients(method: str, sigmas: np.ndarray, solver_order: int,
                           final_sigmas_type: str) -> np.ndarray:
  """Weights [n, 2, NUM_TERMS]: row 0 corrects x_k (identity without a corrector), row 1 predicts
  x_{k+1} from the corrected x_k.

  Orders follow diffusers: warm-up min(order, k + 1); `lower_order_final` (min(order, n - k) for
  UniPC; first order on the last step for DPM-Solver++ when σ_n = 0 or n < 15). UniPC's corrector
  at step k has the order of the predictor of step k - 1 and reuses x̂_0 at the uncorrected x_k.
  """
  num_steps = len(sigmas) - 1
  alpha, sigma_vp, lam = _step_constants(sigmas.astype(np.float64))
  table = np.zeros((num_steps, 2, NUM_TERMS))
  table[:, 0, 0] = 1.0
  orders = [min(solver_order, num_steps - k, k + 1) for k in range(num_steps)]
  for k in range(num_steps):
    if method == "dpmpp_2m":
      lower_final = k == num_steps - 1 and (final_sigmas_type == "zero" or num_steps < 15)
      table[k, 1] = _dpmpp_2m_row(alpha, sigma_vp, lam, k, k > 0 and not lower_final)
      continue
    if k > 0:
      table[k, 0] = _unipc_row(alpha, sigma_vp, lam, k - 1, k, orders[k - 1], corrector=True)
    table[k, 1] = _unipc_row(alpha, sigma_vp, lam, k, k + 1, orders[k], corrector=False)
  return table


def _final_sigma(table: np.ndarray, final_sigmas_type: str) -> float:
  return 0.0 if final_sigmas_type == "zero" else float(table[0])


def multistep_tables(schedule: Schedule, method: str, num_steps: int, spacing: str,
                     steps_offset: int, karras: bool, final_sigmas_type: str,
                     solver_order: int) -> dict[str, np.ndarray]:
  """Timesteps, ᾱ = 1 / (σ² + 1) and the multistep weights of `dpmpp_2m` / `unipc`."""
  table = sigma_table(schedule)
  if karras:  # diffusers' DPM-Solver++ and UniPC round the Karras timesteps.
    sigmas = karras_sigmas(table[0], table[-1], num_steps)
    grid = np.round(sigma_to_timestep(sigmas, table))
  else:
    grid = timesteps(schedule, num_steps, spacing, steps_offset, convention="multistep")
    sigmas = table[grid]
  sigmas = _float32(np.append(sigmas, _final_sigma(table, final_sigmas_type))).astype(np.float64)
  alpha_bar = 1.0 / (sigmas**2 + 1.0)
  return dict(t=_float32(grid), alpha_bar=_float32(alpha_bar[:-1]),
              alpha_bar_next=_float32(alpha_bar[1:]),
              coefficients=_float32(multistep_coefficients(method, sigmas, solver_order,
                                                           final_sigmas_type)))


def sigma_tables(schedule: Schedule, num_steps: int, spacing: str, steps_offset: int,
                 karras: bool, final_sigmas_type: str) -> dict[str, np.ndarray]:
  """σ_k, σ_{k+1}, the model timesteps at both, and diffusers' `init_noise_sigma`."""
  table = sigma_table(schedule)
  grid = timesteps(schedule, num_steps, spacing, steps_offset, convention="sigma")
  sigmas = np.interp(grid.astype(np.float64), np.arange(len(table)), table)
  if karras:  # Karras et al. 2022 eq. 5 between the grid's own end points.
    sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
    grid = sigma_to_timestep(sigmas, table)
  sigmas = _float32(np.append(sigmas, _final_sigma(table, final_sigmas_type)))
  sigma_max = float(sigmas.max())
  # diffusers' quirk: x_T · σ_max for linspace and trailing, x_T · sqrt(σ_max² + 1) for leading.
  init = sigma_max if spacing in ("linspace", "trailing") else np.sqrt(sigma_max**2 + 1.0)
  return dict(t=_float32(grid), t_next=_float32(np.append(grid[1:], 0.0)),
              sigma=sigmas[:-1], sigma_next=sigmas[1:], init_scale=_float32(init))


def method_tables(schedule: Schedule, method: str, num_steps: int, spacing: str, *,
                  steps_offset: int = 0, set_alpha_to_one: bool = True, karras: bool = False,
                  final_sigmas_type: str = "zero", solver_order: int = 2) -> dict[str, np.ndarray]:
  """The host tables of `method` (fields of `samplers.StepParams`, plus `init_scale`)."""
  family = FAMILIES[method]
  if family == "ddim":
    grid = timesteps(schedule, num_steps, spacing, steps_offset)
    return ddim_tables(schedule, method, grid, set_alpha_to_one)
  if family == "multistep":
    return multistep_tables(schedule, method, num_steps, spacing, steps_offset, karras,
                            final_sigmas_type, solver_order)
  return sigma_tables(schedule, num_steps, spacing, steps_offset, karras, final_sigmas_type)
