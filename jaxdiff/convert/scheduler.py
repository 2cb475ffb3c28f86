"""Read a diffusers scheduler config into jaxdiff terms: schedule, prediction, sampler arguments.

`scheduler_spec(source)` accepts a config dict, a `scheduler_config.json`, a pipeline folder
(its `scheduler/` subfolder) or a scheduler folder. Every field the diffusers class defines is
either honoured or, when jaxdiff cannot reproduce the value, rejected with a ValueError naming the
field and value; fields a config omits take the diffusers class's default. Fields that only act
together with an option jaxdiff rejects (e.g. `dynamic_thresholding_ratio` without
`thresholding`) are inert and accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxdiff.diffusion.schedules import (make_schedule, rescale_betas_zero_terminal_snr, Schedule,
                                         schedule_from_betas)

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, rescale_betas_zero_snr=False, prediction_type="epsilon",
                 timestep_spacing="linspace", steps_offset=0)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=None, sample_max_value=None)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0)
_SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_SOLVER = dict(_SIGMAS, **_THRESHOLD, use_flow_sigmas=False, flow_shift=None,
               final_sigmas_type="zero", lower_order_final=True, use_dynamic_shifting=False,
               time_shift_type=None, solver_order=2)
# Per class: (jaxdiff method, {field: diffusers default}).
_CLASSES = {
    "DDPMScheduler": ("ddpm", dict(_SCHEDULE, **_THRESHOLD, **_CLIP, timestep_spacing="leading",
                                   variance_type="fixed_small")),
    "DDIMScheduler": ("ddim", dict(_SCHEDULE, **_THRESHOLD, **_CLIP, timestep_spacing="leading",
                                   set_alpha_to_one=True)),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", dict(
        _SCHEDULE, **_SOLVER, algorithm_type="dpmsolver++", solver_type="midpoint",
        euler_at_final=False, use_lu_lambdas=False, lambda_min_clipped=-math.inf,
        variance_type=None)),
    "UniPCMultistepScheduler": ("unipc", dict(
        _SCHEDULE, **_SOLVER, predict_x0=True, solver_type="bh2", disable_corrector=[],
        solver_p=None, sigma_min=None, sigma_max=None, shift_terminal=None)),
    "EulerDiscreteScheduler": ("euler", dict(
        _SCHEDULE, **_SIGMAS, interpolation_type="linear", sigma_min=None, sigma_max=None,
        timestep_type="discrete", final_sigmas_type="zero")),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", dict(_SCHEDULE)),
    "HeunDiscreteScheduler": ("heun", dict(_SCHEDULE, **_SIGMAS, clip_sample_range=1.0,
                                           beta_start=0.00085, beta_end=0.012,
                                           clip_sample=False)),
}
_FLOW = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=None,
             max_shift=None, base_image_seq_len=None, max_image_seq_len=None, invert_sigmas=False,
             shift_terminal=None, time_shift_type=None, stochastic_sampling=False, **_SIGMAS)
_FLOW_CLASSES = {"FlowMatchEulerDiscreteScheduler": ("euler", _FLOW),
                 "FlowMatchHeunDiscreteScheduler": ("heun", _FLOW)}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large",
              "learned_range": "learned"}


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
  """A diffusers scheduler in jaxdiff terms.

  Attributes:
    kind: `diffusion` (call `diffusion.sample(model_fn, spec.schedule, x_T, key,
      num_steps=n, **spec.sample_kwargs)`) or `flow` (`flow.sample_flow(model_fn, x_T, key,
      num_steps=n, **spec.sample_kwargs)`).
    schedule: the training schedule (None for flow matching).
    prediction: `eps | x0 | v`, or `velocity` for flow matching.
    method: the jaxdiff sampler that reproduces the scheduler.
    sample_kwargs: keyword arguments for the sampler, including `method` (and `prediction`).
    class_name: the diffusers class.
  """
  kind: str
  schedule: Schedule | None
  prediction: str
  method: str
  sample_kwargs: dict[str, Any]
  class_name: str


def read_scheduler_config(source: str | os.PathLike | dict) -> dict:
  """The config dict of `source`: a dict, a JSON file, a scheduler folder or a pipeline folder."""
  if isinstance(source, dict):
    return dict(source)
  path = os.fspath(source)
  for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"),
                    os.path.join(path, "scheduler_config.json"), path):
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f)
  raise FileNotFoundError(f"{path}: no scheduler_config.json (looked in {path}/scheduler/ and "
                          f"{path}/)")


def _unsupported(field: str, value: Any, fix: str) -> ValueError:
  return ValueError(f"scheduler config {field}={value!r} is not supported by jaxdiff; {fix}")


def _require(config: dict, field: str, allowed: tuple, fix: str) -> None:
  if config[field] not in allowed:
    raise _unsupported(field, config[field], fix)


def _resolve(config: dict, defaults: dict, class_name: str) -> dict:
  """The config with defaults filled in; unknown fields are an error."""
  unknown = [k for k in config if not k.startswith("_") and k not in defaults]
  if unknown:
    raise _unsupported(unknown[0], config[unknown[0]],
                       f"jaxdiff does not know this field of {class_name}")
  return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _schedule(config: dict) -> Schedule:
  """The Schedule of a config's beta fields (tables in float64, as `make_schedule`)."""
  total = int(config["num_train_timesteps"])
  if config["trained_betas"] is not None:
    betas = np.asarray(config["trained_betas"], np.float64)
    if config["rescale_betas_zero_snr"]:
      betas = rescale_betas_zero_terminal_snr(betas)
    return schedule_from_betas(betas)
  _require(config, "beta_schedule", tuple(_BETA_SCHEDULES), f"use one of {tuple(_BETA_SCHEDULES)}")
  return make_schedule(_BETA_SCHEDULES[config["beta_schedule"]], total,
                       beta_start=config["beta_start"], beta_end=config["beta_end"],
                       rescale_zero_terminal_snr=config["rescale_betas_zero_snr"])


def _check_common(config: dict, method: str) -> None:
  if config.get("thresholding"):
    raise _unsupported("thresholding", True, "dynamic thresholding is not implemented")
  for field in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                "use_dynamic_shifting", "euler_at_final", "invert_sigmas", "stochastic_sampling"):
    if config.get(field):
      raise _unsupported(field, config[field], "set it to false")
  if config.get("clip_sample") and config.get("clip_sample_range", 1.0) != 1.0:
    raise _unsupported("clip_sample_range", config["clip_sample_range"], "jaxdiff clips to [-1, 1]")
  if config.get("rescale_betas_zero_snr") and method not in ("ddpm", "ddim"):
    raise _unsupported("rescale_betas_zero_snr", True,
                       "zero terminal SNR is reproduced only by DDPMScheduler and DDIMScheduler")
  for field in ("sigma_min", "sigma_max", "shift_terminal", "solver_p", "variance_type"):
    if field in config and config[field] is not None and method != "ddpm":
      raise _unsupported(field, config[field], "leave it unset (null)")


def _method_options(config: dict, method: str) -> dict:
  """Sampler keyword arguments of the fields specific to `method`."""
  options = {}
  if method == "ddpm":
    _require(config, "variance_type", tuple(_VARIANCES), f"use one of {tuple(_VARIANCES)}")
    options["variance"] = _VARIANCES[config["variance_type"]]
  if method in ("ddpm", "ddim", "heun"):
    options["clip_denoised"] = bool(config["clip_sample"])
  if method == "ddim":
    options["set_alpha_to_one"] = bool(config["set_alpha_to_one"])
    options["use_clipped_model_output"] = False  # DDIMScheduler.step's default.
  if method in ("dpmpp_2m", "unipc", "euler", "heun"):
    options["karras_sigmas"] = bool(config["use_karras_sigmas"])
  if method in ("dpmpp_2m", "unipc", "euler"):
    _require(config, "final_sigmas_type", ("zero", "sigma_min"), "use zero or sigma_min")
    options["final_sigmas_type"] = config["final_sigmas_type"]
  if method == "dpmpp_2m":
    _require(config, "algorithm_type", ("dpmsolver++",), "use dpmsolver++")
    _require(config, "solver_order", (2,), "jaxdiff's dpmpp_2m is second order")
    _require(config, "solver_type", ("midpoint",), "use midpoint")
    _require(config, "lambda_min_clipped", (-math.inf,), "leave it at -inf")
    if options["karras_sigmas"] and config["beta_schedule"] == "squaredcos_cap_v2":
      raise _unsupported("use_karras_sigmas", True, "not with squaredcos_cap_v2 (unrounded grid)")
  if method in ("dpmpp_2m", "unipc"):
    _require(config, "lower_order_final", (True,), "set it to true")
  if method == "unipc":
    _require(config, "solver_order", (1, 2, 3), "use 1, 2 or 3")
    _require(config, "solver_type", ("bh2",), "use bh2")
    _require(config, "predict_x0", (True,), "set it to true")
    _require(config, "disable_corrector", ([],), "leave it empty")
    options["solver_order"] = int(config["solver_order"])
  if method == "euler":
    _require(config, "interpolation_type", ("linear",), "use linear")
    _require(config, "timestep_type", ("discrete",), "use discrete")
  return options


def _flow_spec(config: dict, class_name: str) -> SchedulerSpec:
  method, defaults = _FLOW_CLASSES[class_name]
  config = _resolve(config, defaults, class_name)
  _check_common(config, method)
  if config["use_karras_sigmas"]:
    raise _unsupported("use_karras_sigmas", True, "flow matching samples on the shifted grid")
  kwargs = dict(method=method, shift=float(config["shift"]),
                num_timesteps=int(config["num_train_timesteps"]))
  return SchedulerSpec("flow", None, "velocity", method, kwargs, class_name)


def scheduler_spec(source: str | os.PathLike | dict) -> SchedulerSpec:
  """Reads a diffusers scheduler config (see `read_scheduler_config`) as a `SchedulerSpec`.

  Raises:
    ValueError: an unknown `_class_name`, or a field jaxdiff does not reproduce, named with its
      value.
  """
  config = read_scheduler_config(source)
  class_name = config.get("_class_name")
  if class_name in _FLOW_CLASSES:
    return _flow_spec(config, class_name)
  if class_name not in _CLASSES:
    raise ValueError(f"scheduler config _class_name={class_name!r} is not supported; jaxdiff "
                     f"reproduces {tuple(_CLASSES) + tuple(_FLOW_CLASSES)}")
  method, defaults = _CLASSES[class_name]
  config = _resolve(config, defaults, class_name)
  _check_common(config, method)
  _require(config, "prediction_type", tuple(_PREDICTIONS), f"use one of {tuple(_PREDICTIONS)}")
  _require(config, "timestep_spacing", ("leading", "linspace", "trailing"),
           "use leading, linspace or trailing")
  prediction = _PREDICTIONS[config["prediction_type"]]
  kwargs = dict(method=method, prediction=prediction, spacing=config["timestep_spacing"],
                steps_offset=int(config["steps_offset"]), **_method_options(config, method))
  return SchedulerSpec("diffusion", _schedule(config), prediction, method, kwargs, class_name)
