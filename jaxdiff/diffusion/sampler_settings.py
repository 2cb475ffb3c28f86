"""How to sample: the one settings dataclass shared by the sample CLI, the training previews,
FID during training and the config's `sample` section, and the methods of each objective."""

import dataclasses
from typing import Any

from jaxdiff.diffusion.flow import FLOW_METHODS
from jaxdiff.diffusion.samplers import METHODS

# What a model was trained for: ddpm (discrete-time noise prediction, `samplers.sample`),
# flow (rectified-flow velocity, `flow.sample_flow`), edm (preconditioned denoiser,
# `edm.sample_edm`).
OBJECTIVES = ("ddpm", "flow", "edm")
EDM_METHODS = ("heun",)
_METHODS = {"ddpm": METHODS, "flow": FLOW_METHODS, "edm": EDM_METHODS}
DEFAULT_NUM_STEPS = 50  # when neither the user nor the model's source sets num_steps


def methods_for(objective: str) -> tuple[str, ...]:
  """The sampler names of a model trained with `objective` (one of `OBJECTIVES`)."""
  if objective not in _METHODS:
    raise ValueError(f"objective={objective!r} is unknown; choose one of {OBJECTIVES}")
  return tuple(_METHODS[objective])


def _setting(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The sampler options of `jaxdiff.diffusion.sample` that a user chooses.

  Each field's `help` metadata is its command-line help (`python -m jaxdiff.sample --FIELD`).
  Options that describe a model's scheduler rather than a choice (steps_offset, final sigmas,
  DDIM's set_alpha_to_one) come with the model (`jaxdiff.sampling.DiffusionModel`).

  Attributes:
    method: sampler name, one of `methods_for(model objective)`; None: the model's own scheduler
      (a diffusers folder's scheduler config; a flow or EDM run's config), else ddim.
    num_steps: number of sampler steps; None: the model's source (a training run's
      config.sample.num_steps), else `DEFAULT_NUM_STEPS`.
    eta: DDIM stochasticity; 0 is deterministic, 1 DDPM's ancestral noise; None: the model's
      source (a training run's config.sample.eta), else 0.
    spacing: timestep grid, leading | linspace | trailing, in the convention of the method's
      diffusers scheduler; None: that scheduler's default (or the model's scheduler config).
    clip_denoised: clip the predicted x_0 to [-1, 1] in every step; None: the default of the
      model's source (the training run's config, a scheduler config's clip_sample).
    guidance_scale: classifier-free guidance scale s; None or 1 sample the conditional model.
    guidance_interval: (t_low, t_high): guide only at model timesteps in that interval
      (Kynkäänniemi et al. 2024), flow models t · T, EDM models σ; empty: everywhere.
    guidance_rescale: φ of CFG rescale (Lin et al. 2024); 0 is off.
    karras_sigmas: Karras et al. σ (ρ = 7) for dpmpp_2m, unipc, euler and heun.
    solver_order: UniPC's order (1-3).
    diffusion_scale: c of the flow `euler_maruyama` sampler's diffusion g²(t) = c t.
    sigma_min, sigma_max, rho: EDM's σ grid (Karras et al. eq. 5).
    s_churn, s_min, s_max, s_noise: EDM's stochastic churn (Table 5); S_churn = 0 is the
      deterministic Heun sampler.

  Spacing, eta, clip_denoised, karras_sigmas and solver_order are for the ddpm objective's
  samplers; the flow and EDM samplers take the guidance settings and their own options.
  """
  method: str | None = _setting(
      None, "Sampler (ddpm models: ddim, ddpm, dpmpp_2m, unipc, euler, euler_ancestral, heun; "
      "flow: euler, heun, euler_maruyama; edm: heun); unset: the model's scheduler config or "
      "a flow/EDM run's config.sample.method, else ddim.")
  num_steps: int | None = _setting(
      None, "Number of sampler steps; unset: the run's config.sample.num_steps, else 50.")
  eta: float | None = _setting(
      None, "DDIM eta (0 = deterministic, 1 = DDPM's noise); unset: the run's config.sample.eta, "
      "else 0.")
  spacing: str | None = _setting(
      None, "Timestep grid: leading | linspace | trailing; unset: the method's diffusers default.")
  clip_denoised: bool | None = _setting(
      None, "Clip the predicted x_0 to [-1, 1] in every step; unset: the run's "
      "config.sample.clip_denoised (a diffusers scheduler config's clip_sample).")
  guidance_scale: float | None = _setting(
      None, "Classifier-free guidance scale s (1 = none); unset: the run's "
      "config.sample.guidance_scale, else none.")
  guidance_interval: tuple[float, ...] = _setting(
      (), "Guide only at model timesteps t_low,t_high (inclusive); empty: the run's "
      "config.sample.guidance_interval, else everywhere.")
  guidance_rescale: float = _setting(
      0.0, "CFG rescale phi (0 = off); 0: the run's config.sample.guidance_rescale.")
  karras_sigmas: bool = _setting(False, "Karras sigmas (dpmpp_2m, unipc, euler, heun).")
  solver_order: int = _setting(2, "UniPC order (1-3).")
  diffusion_scale: float = _setting(1.0, "Flow euler_maruyama: c of the diffusion g^2 = c t.")
  sigma_min: float = _setting(0.002, "EDM: smallest noise level of the grid.")
  sigma_max: float = _setting(80.0, "EDM: largest noise level of the grid.")
  rho: float = _setting(7.0, "EDM: rho of the noise-level spacing.")
  s_churn: float = _setting(0.0, "EDM: stochastic churn S_churn (0 = deterministic).")
  s_min: float = _setting(0.0, "EDM: churn only at sigma >= S_min.")
  s_max: float = _setting(float("inf"), "EDM: churn only at sigma <= S_max.")
  s_noise: float = _setting(1.0, "EDM: churn noise scale S_noise.")

  @property
  def steps(self) -> int:
    """`num_steps`, or `DEFAULT_NUM_STEPS` when unset."""
    return DEFAULT_NUM_STEPS if self.num_steps is None else self.num_steps

  @property
  def guided(self) -> bool:
    """Whether classifier-free guidance is on (a scale other than None and 1)."""
    return self.guidance_scale is not None and self.guidance_scale != 1.0

  def sample_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `jaxdiff.diffusion.sample` (method resolved to ddim if unset)."""
    kwargs = dict(method=self.method or "ddim", num_steps=self.steps, eta=self.eta or 0.0,
                  spacing=self.spacing, clip_denoised=bool(self.clip_denoised),
                  karras_sigmas=self.karras_sigmas, solver_order=self.solver_order)
    return {**kwargs, **self._guidance_kwargs()}

  def flow_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `jaxdiff.diffusion.flow.sample_flow` (method resolved to euler)."""
    return dict(method=self.method or "euler", num_steps=self.steps,
                diffusion_scale=self.diffusion_scale, **self._guidance_kwargs())

  def edm_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `jaxdiff.diffusion.edm.sample_edm` (its one method, Heun)."""
    return dict(num_steps=self.steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                rho=self.rho, s_churn=self.s_churn, s_min=self.s_min, s_max=self.s_max,
                s_noise=self.s_noise, **self._guidance_kwargs())

  def _guidance_kwargs(self) -> dict[str, Any]:
    if not self.guided:
      return {}
    return dict(guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                guidance_interval=tuple(self.guidance_interval) or None)
