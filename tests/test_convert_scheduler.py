"""Scheduler configs written by diffusers itself, read back as jaxdiff samplers."""
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

from jaxdiff.convert.scheduler import scheduler_spec
from jaxdiff.diffusion import flow, sample
from scheduler_reference import (assert_trajectories_close, diffusers_trajectory, jax_model,
                                 jax_noises, torch_model)

DEFAULTS = [  # (class, method, default spacing)
    (DDPMScheduler, "ddpm", "leading"), (DDIMScheduler, "ddim", "leading"),
    (DPMSolverMultistepScheduler, "dpmpp_2m", "linspace"),
    (UniPCMultistepScheduler, "unipc", "linspace"), (EulerDiscreteScheduler, "euler", "linspace"),
    (EulerAncestralDiscreteScheduler, "euler_ancestral", "linspace"),
    (HeunDiscreteScheduler, "heun", "linspace")]


@pytest.mark.parametrize("cls, method, spacing", DEFAULTS)
def test_default_configs(tmp_path, cls, method, spacing):
  reference = cls()
  reference.save_config(tmp_path)
  spec = scheduler_spec(tmp_path)
  assert spec.kind == "diffusion" and spec.method == method and spec.prediction == "eps"
  assert spec.sample_kwargs["spacing"] == spacing and spec.sample_kwargs["method"] == method
  np.testing.assert_allclose(spec.schedule.alphas_cumprod, reference.alphas_cumprod.numpy(),
                             rtol=2e-5)


def test_pipeline_folder_and_dict(tmp_path):
  DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                clip_sample=False, set_alpha_to_one=False).save_config(tmp_path / "scheduler")
  spec = scheduler_spec(tmp_path)
  assert spec.sample_kwargs == dict(method="ddim", prediction="eps", spacing="leading",
                                    steps_offset=1, clip_denoised=False, set_alpha_to_one=False,
                                    use_clipped_model_output=False)
  with open(tmp_path / "scheduler" / "scheduler_config.json") as f:
    assert scheduler_spec(json.load(f)).sample_kwargs == spec.sample_kwargs
  assert scheduler_spec(tmp_path / "scheduler" / "scheduler_config.json").method == "ddim"


SPEC_CASES = [
    (DDIMScheduler, "ddim", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 steps_offset=1, set_alpha_to_one=False, clip_sample=True)),
    # diffusers adds β_t-sized noise on the last step of a trailing fixed_large grid (t > 0 there);
    # jaxdiff never adds noise on the last step, so this case uses the leading grid (ends at 0).
    (DDPMScheduler, "ddpm", dict(prediction_type="v_prediction", clip_sample=False,
                                 variance_type="fixed_large")),
    (DDPMScheduler, "ddpm", dict(timestep_spacing="trailing", clip_sample=True)),
    (DPMSolverMultistepScheduler, "dpmpp_2m", dict(use_karras_sigmas=True,
                                                   prediction_type="v_prediction")),
    (UniPCMultistepScheduler, "unipc", dict(solver_order=3, timestep_spacing="trailing",
                                            beta_schedule="squaredcos_cap_v2")),
    (EulerDiscreteScheduler, "euler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, steps_offset=1,
                                           timestep_spacing="leading")),
    (EulerAncestralDiscreteScheduler, "euler_ancestral", dict(prediction_type="v_prediction")),
    (HeunDiscreteScheduler, "heun", dict(use_karras_sigmas=True, clip_sample=True)),
]


@pytest.mark.parametrize("cls, method, config", SPEC_CASES)
def test_spec_drives_sample_to_diffusers_trajectory(tmp_path, monkeypatch, cls, method, config):
  cls(**config).save_config(tmp_path)
  spec = scheduler_spec(tmp_path)
  reference = cls.from_config(cls.load_config(tmp_path))
  reference.set_timesteps(8)
  x_T = 1.5 * np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  key = jax.random.key(2)
  noises = None
  if method in ("ddpm", "euler_ancestral"):
    noises = jax_noises(method, 8, key, x_T.shape)
  expected = diffusers_trajectory(method, reference, x_T, noises=noises, monkeypatch=monkeypatch)
  _, got = sample(jax_model, spec.schedule, x_T, key, num_steps=8, return_trajectory=True,
                  **spec.sample_kwargs)
  assert_trajectories_close(got, expected)


@pytest.mark.parametrize("cls", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_flow_spec_drives_sample_flow(tmp_path, cls):
  cls(shift=3.0).save_config(tmp_path)
  spec = scheduler_spec(tmp_path)
  assert spec.kind == "flow" and spec.prediction == "velocity" and spec.schedule is None
  reference = cls(shift=3.0)
  reference.set_timesteps(6)
  x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32))
  x_T = x.numpy()
  for t in reference.timesteps:
    x = reference.step(torch_model(x, t), t, x).prev_sample
  got = flow.sample_flow(jax_model, x_T, jax.random.key(0), num_steps=6, **spec.sample_kwargs)
  np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls, config, match", [
    (DDIMScheduler, dict(thresholding=True), "thresholding=True"),
    (DDIMScheduler, dict(clip_sample_range=2.0), "clip_sample_range=2.0"),
    (DDPMScheduler, dict(variance_type="learned"), "variance_type='learned'"),
    (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (DPMSolverMultistepScheduler, dict(solver_order=3), "solver_order=3"),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "use_lu_lambdas=True"),
    (UniPCMultistepScheduler, dict(solver_type="bh1"), "solver_type='bh1'"),
    (UniPCMultistepScheduler, dict(disable_corrector=[0]), "disable_corrector"),
    (EulerDiscreteScheduler, dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    (EulerDiscreteScheduler, dict(interpolation_type="log_linear"), "interpolation_type"),
    (EulerDiscreteScheduler, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
])
def test_unsupported_options_are_named(tmp_path, cls, config, match):
  cls(**config).save_config(tmp_path)
  with pytest.raises(ValueError, match=match):
    scheduler_spec(tmp_path)


def test_unknown_class_and_field():
  with pytest.raises(ValueError, match="_class_name='LMSDiscreteScheduler'"):
    scheduler_spec({"_class_name": "LMSDiscreteScheduler"})
  with pytest.raises(ValueError, match="beta_warmup=0.1"):
    scheduler_spec({"_class_name": "DDIMScheduler", "beta_warmup": 0.1})
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    scheduler_spec("/nonexistent/folder")
