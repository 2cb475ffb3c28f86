"""How to sample: the one settings dataclass shared by the sample CLI, the training previews,
FID during training and the config's `sample` section."""

import dataclasses
from typing import Any


def _setting(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The sampler options of `jaxdiff.diffusion.sample` that a user chooses.

  Each field's `help` metadata is its command-line help (`python -m jaxdiff.sample --FIELD`).
  Options that describe a model's scheduler rather than a choice (steps_offset, final sigmas,
  DDIM's set_alpha_to_one) come with the model (`jaxdiff.sampling.DiffusionModel`).

  Attributes:
    method: sampler name (see `jaxdiff.diffusion.METHODS`); None: the model's own scheduler (a
      diffusers folder's scheduler config), else ddim.
    num_steps: number of sampler steps.
    eta: DDIM stochasticity; 0 is deterministic.
    spacing: timestep grid, leading | linspace | trailing, in the convention of the method's
      diffusers scheduler; None: that scheduler's default (or the model's scheduler config).
    clip_denoised: clip the predicted x_0 to [-1, 1] in every step; None: the default of the
      model's source (the training run's config, a scheduler config's clip_sample).
    guidance_scale: classifier-free guidance scale s; None or 1 sample the conditional model.
    guidance_interval: (t_low, t_high): guide only at model timesteps in that interval
      (Kynkäänniemi et al. 2024); empty: everywhere.
    guidance_rescale: φ of CFG rescale (Lin et al. 2024); 0 is off.
    karras_sigmas: Karras et al. σ (ρ = 7) for dpmpp_2m, unipc, euler and heun.
    solver_order: UniPC's order (1-3).
  """
  method: str | None = _setting(None, "Sampler; unset: the model's scheduler config, else ddim.")
  num_steps: int = _setting(50, "Number of sampler steps.")
  eta: float = _setting(0.0, "DDIM eta (0 = deterministic).")
  spacing: str | None = _setting(
      None, "Timestep grid: leading | linspace | trailing; unset: the method's diffusers default.")
  clip_denoised: bool | None = _setting(
      None, "Clip the predicted x_0 to [-1, 1] in every step; unset: the run's "
      "config.sample.clip_denoised (a diffusers scheduler config's clip_sample).")
  guidance_scale: float | None = _setting(
      None, "Classifier-free guidance scale s; unset or 1 = none.")
  guidance_interval: tuple[float, ...] = _setting(
      (), "Guide only at model timesteps t_low,t_high (inclusive); empty: everywhere.")
  guidance_rescale: float = _setting(0.0, "CFG rescale phi (0 = off).")
  karras_sigmas: bool = _setting(False, "Karras sigmas (dpmpp_2m, unipc, euler, heun).")
  solver_order: int = _setting(2, "UniPC order (1-3).")

  @property
  def guided(self) -> bool:
    """Whether classifier-free guidance is on (a scale other than None and 1)."""
    return self.guidance_scale is not None and self.guidance_scale != 1.0

  def sample_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `jaxdiff.diffusion.sample` (method resolved to ddim if unset)."""
    kwargs = dict(method=self.method or "ddim", num_steps=self.num_steps, eta=self.eta,
                  spacing=self.spacing, clip_denoised=bool(self.clip_denoised),
                  karras_sigmas=self.karras_sigmas, solver_order=self.solver_order)
    if self.guided:
      kwargs.update(guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                    guidance_interval=tuple(self.guidance_interval) or None)
    return kwargs
