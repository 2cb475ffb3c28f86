"""diffusers' sampling loop and a tiny analytic model pair, shared by the sampler tests (a test
helper, not a test)."""
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from jaxdiff.diffusion import sampler_tables, samplers

T = 1000
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler}
NOISE_FUNCTIONS = {"ddpm": scheduling_ddpm, "euler_ancestral": scheduling_euler_ancestral_discrete}
SLOPE = 1.3


def jax_model(x, t):
  """A nonlinear stand-in for a network: tanh(1.3 x + t / 1000), elementwise."""
  return jnp.tanh(SLOPE * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0)


def torch_model(x, t):
  return torch.tanh(SLOPE * x + float(t) / 1000.0)


def make_scheduler(method, num_steps, **config):
  """diffusers' scheduler of `method` with its defaults, except the schedule (linear 1e-4..0.02,
  which Heun's defaults differ from) and `config`."""
  scheduler = SCHEDULERS[method](num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                 beta_schedule="linear", **config)
  scheduler.set_timesteps(num_steps)
  return scheduler


def diffusers_trajectory(method, scheduler, x_T, model=torch_model, noises=None, monkeypatch=None):
  """Runs diffusers' sampling loop as its pipelines do: x_T · init_noise_sigma, scale_model_input,
  step. Returns [n + 1, ...] float64 on the VP scale (σ-space y / sqrt(σ² + 1)) after each
  completed step. `noises` [n, ...] replaces the scheduler's `randn_tensor` draws in order."""
  if noises is not None:
    draws = iter(torch.from_numpy(np.asarray(n)) for n in noises)
    monkeypatch.setattr(NOISE_FUNCTIONS[method], "randn_tensor", lambda *a, **k: next(draws))
  sigma_space = sampler_tables.FAMILIES[method] == "sigma"
  x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
  frames = [x.double() / (scheduler.sigmas.max().double()**2 + 1).sqrt() if sigma_space
            else x.double()]
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    last = i == len(scheduler.timesteps) - 1
    if method == "heun" and not scheduler.state_in_first_order and not last:
      continue  # Halfway through a Heun step.
    scale = (scheduler.sigmas[scheduler.step_index].double()**2 + 1).sqrt() if sigma_space else 1
    frames.append(x.double() / scale)
  return torch.stack(frames).numpy()


def jax_noises(method, num_steps, key, shape):
  """The noise `sample` draws at each step."""
  keys = samplers.example_keys(key, shape[0])
  return [np.asarray(samplers.step_noise(keys, k, shape)) for k in range(num_steps)]


def assert_trajectories_close(got, expected, rtol=1e-4):
  """Max |got - expected| relative to max |expected| at each step."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape
  axes = tuple(range(1, got.ndim))
  error = np.abs(got - expected).max(axis=axes) / np.abs(expected).max(axis=axes)
  assert error.max() < rtol, error


