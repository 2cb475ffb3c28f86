"""Pure diffusion math: schedules, the forward process, losses, samplers, guidance, likelihood,
flow matching (`flow`) and EDM (`edm`).

Knows nothing of models or training: a model is any `model_fn(x_t, t) -> prediction`.
"""
from jaxdiff.diffusion import edm
from jaxdiff.diffusion import flow
from jaxdiff.diffusion.guidance import classifier_free_guidance
from jaxdiff.diffusion.guidance import rescale_guidance
from jaxdiff.diffusion.keys import per_example_keys
from jaxdiff.diffusion.likelihood import bits_per_dim
from jaxdiff.diffusion.likelihood import discretized_gaussian_log_likelihood
from jaxdiff.diffusion.likelihood import normal_kl
from jaxdiff.diffusion.likelihood import vlb_terms
from jaxdiff.diffusion.losses import diffusion_loss
from jaxdiff.diffusion.losses import LOSS_TYPES
from jaxdiff.diffusion.losses import min_snr_weight
from jaxdiff.diffusion.losses import training_inputs
from jaxdiff.diffusion.losses import WEIGHTINGS
from jaxdiff.diffusion.sampler_settings import EDM_METHODS
from jaxdiff.diffusion.sampler_settings import methods_for
from jaxdiff.diffusion.sampler_settings import OBJECTIVES
from jaxdiff.diffusion.sampler_settings import SamplerSettings
from jaxdiff.diffusion.sampler_tables import DEFAULT_SPACINGS
from jaxdiff.diffusion.samplers import METHODS
from jaxdiff.diffusion.samplers import scan_steps
from jaxdiff.diffusion.samplers import sample
from jaxdiff.diffusion.samplers import VARIANCES
from jaxdiff.diffusion.schedules import make_schedule
from jaxdiff.diffusion.schedules import Schedule
from jaxdiff.diffusion.schedules import SCHEDULE_NAMES
from jaxdiff.diffusion.schedules import karras_sigmas
from jaxdiff.diffusion.schedules import sigma_table
from jaxdiff.diffusion.schedules import SPACINGS
from jaxdiff.diffusion.schedules import timesteps
from jaxdiff.diffusion.targets import eps_from_score
from jaxdiff.diffusion.targets import eps_from_v
from jaxdiff.diffusion.targets import eps_from_x0
from jaxdiff.diffusion.targets import PREDICTIONS
from jaxdiff.diffusion.targets import prediction_target
from jaxdiff.diffusion.targets import q_sample
from jaxdiff.diffusion.targets import score_from_eps
from jaxdiff.diffusion.targets import snr
from jaxdiff.diffusion.targets import v_from_x0_eps
from jaxdiff.diffusion.targets import x0_and_eps
from jaxdiff.diffusion.targets import x0_from_eps
from jaxdiff.diffusion.targets import x0_from_v
