"""How to sample: the one settings dataclass shared by the sample CLI, the training previews,
FID during training and the config's `sample` section."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The sampler options of `jaxdiff.diffusion.sample` that a user chooses.

  Each field's `help` metadata is its command-line help (`python -m jaxdiff.sample --FIELD`).

  Attributes:
    method: sampler name (see `jaxdiff.diffusion.METHODS`).
    num_steps: length of the timestep grid.
    eta: DDIM stochasticity; 0 is deterministic.
    spacing: timestep grid: leading | linspace | trailing.
    clip_denoised: clip the predicted x_0 to [-1, 1] in every step (None: take the default of the
      model's source, e.g. the training run's config).
    guidance_scale: classifier-free guidance scale s; None or 1 sample the conditional model.
  """
  method: str = dataclasses.field(default="ddim", metadata={"help": "Sampler."})
  num_steps: int = dataclasses.field(default=50, metadata={"help": "Length of the timestep grid."})
  eta: float = dataclasses.field(default=0.0, metadata={"help": "DDIM eta (0 = deterministic)."})
  spacing: str = dataclasses.field(
      default="leading", metadata={"help": "Timestep grid: leading | linspace | trailing."})
  clip_denoised: bool | None = dataclasses.field(
      default=None, metadata={"help": "Clip the predicted x_0 to [-1, 1] in every step; unset: "
                               "the run's config.sample.clip_denoised (False for diffusers)."})
  guidance_scale: float | None = dataclasses.field(
      default=None, metadata={"help": "Classifier-free guidance scale s; unset or 1 = none."})

  @property
  def guided(self) -> bool:
    """Whether classifier-free guidance is on (a scale other than None and 1)."""
    return self.guidance_scale is not None and self.guidance_scale != 1.0
