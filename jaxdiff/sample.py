r"""Samples images from a training run or a diffusers model folder: grid PNG, ADM-style npz, GIF.

  python -m jaxdiff.sample --workdir=runs/cifar_dit --method=ddim --num_steps=50 \
      --num_samples=50000 --batch_size=500 --seed=0
  python -m jaxdiff.sample --diffusers=path/to/ddpm-cifar10 --out=samples/ --animate

Writes to --out (default WORKDIR/samples/), with TAG naming the checkpoint, sampler and seed:
  samples_TAG.npz  arr_0: uint8 [N, H, W, C]; arr_1: int labels [N] (class-conditional models);
                   plus 0-d metadata arrays method, num_steps, eta, guidance_scale (1 = none), seed,
                   checkpoint_step (-1 for diffusers folders), use_ema, ema_decay (0 = raw
                   params), clip_denoised, spacing, source.
  grid_TAG.png     the first 64 samples.
  reverse_TAG.gif  with --animate: the reverse process of the first 16 samples.
Samples are quantised as round(clip((x + 1) * 127.5, 0, 255)) (float32, round half to even).
Bad input exits with one line on stderr (`error: ...`) and status 2, as the training CLI.
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import sys
from typing import Any

import jax
from absl import app, flags

from jaxdiff import convert, diffusion, images, sampling
from jaxdiff.train import checkpoint

METHODS = diffusion.METHODS
SPACINGS = diffusion.SPACINGS
PREDICTIONS = diffusion.PREDICTIONS

EXIT_ERROR = 2  # As `python -m jaxdiff.train`: a problem reported on one line.


class SampleInputError(ValueError):
  """Bad user input: reported as one line on stderr."""


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """What the CLI was asked to do; fields mirror the flags of the same name."""
  workdir: str | None = None
  diffusers: str | None = None
  step: int | None = None
  schedule: str = "linear"
  num_timesteps: int = 1000
  prediction: str = "eps"
  image_size: int | None = None
  channels: int | None = None
  sampler: sampling.SamplerSettings = sampling.SamplerSettings()
  labels: tuple[int, ...] = ()
  num_samples: int = 64
  batch_size: int = 64
  seed: int = 0
  use_ema: bool = True
  ema_decay: float | None = None
  out: str | None = None
  animate: bool = False
  animate_frames: int = 20


def parse_labels(text: str) -> tuple[int, ...]:
  """'3, 5,7' -> (3, 5, 7); '' -> ()."""
  try:
    labels = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise SampleInputError(f"--labels={text!r} must be comma-separated integers") from None
  if any(label < 0 for label in labels):
    raise SampleInputError(f"--labels={text!r} must be >= 0")
  return labels


def check_options(options: SampleOptions) -> None:
  """Checks what can be checked before loading a model; raises SampleInputError."""
  if (options.workdir is None) == (options.diffusers is None):
    raise SampleInputError("give exactly one of --workdir (a training run) and --diffusers")
  source = options.workdir or options.diffusers
  if not os.path.isdir(source):
    raise SampleInputError(f"{source} is not a directory")
  settings = options.sampler
  choices = [("method", settings.method, METHODS), ("spacing", settings.spacing, SPACINGS),
             ("prediction", options.prediction, PREDICTIONS)]
  for name, value, allowed in choices:
    if value not in allowed:
      raise SampleInputError(f"--{name}={value!r} is unknown; choose one of {', '.join(allowed)}")
  positive = [("num_samples", options.num_samples), ("batch_size", options.batch_size),
              ("num_steps", settings.num_steps), ("animate_frames", options.animate_frames)]
  for name, value in positive:
    if value <= 0:
      raise SampleInputError(f"--{name}={value} must be > 0")
  if settings.eta < 0:
    raise SampleInputError(f"--eta={settings.eta} must be >= 0")
  if settings.guidance_scale is not None and settings.guidance_scale < 0:
    raise SampleInputError(f"--guidance_scale={settings.guidance_scale} must be >= 0")
  if options.schedule not in diffusion.SCHEDULE_NAMES:
    raise SampleInputError(f"--schedule={options.schedule!r} is unknown; choose one of "
                           f"{', '.join(diffusion.SCHEDULE_NAMES)}")


def load_model(options: SampleOptions) -> tuple[sampling.DiffusionModel, dict[str, Any]]:
  """Loads the model of a training run or a diffusers folder.

  Returns:
    (model, provenance): provenance holds `checkpoint_step` (-1 for a diffusers folder),
    `ema_decay` (0.0 when sampling the raw parameters) and `clip_denoised`, the default for
    --clip_denoised (the run's config.sample.clip_denoised; False for a diffusers folder).
  """
  if options.diffusers is not None:
    provenance = {"checkpoint_step": -1, "ema_decay": 0.0, "clip_denoised": False}
    return load_diffusers_model(options), provenance
  return load_checkpoint_model(options)


def load_diffusers_model(options: SampleOptions) -> sampling.DiffusionModel:
  """A diffusers folder through `jaxdiff.convert.load_diffusers`, with the schedule of the flags.

  The image size and channels come from config.json (sample_size, in_channels) unless given.
  """
  try:
    schedule = diffusion.make_schedule(options.schedule, options.num_timesteps)
    module, params = convert.load_diffusers(options.diffusers)
  except (ValueError, KeyError) as error:
    raise SampleInputError(f"cannot load {options.diffusers}: {error}") from None
  with open(os.path.join(options.diffusers, "config.json")) as f:
    config = json.load(f)
  size = options.image_size or config.get("sample_size")
  channels = options.channels or config.get("in_channels")
  if not size or not channels:
    raise SampleInputError(f"{options.diffusers}/config.json has no sample_size/in_channels; "
                           "pass --image_size and --channels")
  height, width = (size, size) if isinstance(size, int) else size
  return sampling.DiffusionModel(
      module=module, params=params,
      schedule=schedule, prediction=options.prediction, image_shape=(height, width, channels),
      num_classes=getattr(module, "num_classes", 0),
      learn_sigma=getattr(module, "learn_sigma", False),
      has_null_label=getattr(module, "class_dropout_prob", 0.0) > 0)


def load_checkpoint_model(options: SampleOptions) -> tuple[sampling.DiffusionModel, dict]:
  """The raw or EMA parameters of a checkpoint of a training run (see `load_model`)."""
  step = options.step
  try:
    with _quiet_orbax():
      if step is None:
        with contextlib.closing(checkpoint.open_manager(options.workdir, read_only=True)) as m:
          step = m.latest_step()
      if step is None:
        raise SampleInputError(f"no checkpoint in {checkpoint.checkpoint_dir(options.workdir)}")
      config, module, params, ema_params = checkpoint.restore_for_inference(
          options.workdir, step)
  except checkpoint.CheckpointError as error:
    raise SampleInputError(str(error)) from None
  ema_decay = 0.0
  if options.use_ema:
    ema_decay = pick_ema_decay(ema_params, options.ema_decay, config.sample.ema_decay)
    params = ema_params[ema_decay]
  model = sampling.DiffusionModel(
      module=module, params=params,
      schedule=diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps),
      prediction=config.diffusion.prediction,
      image_shape=(config.data.image_size, config.data.image_size, config.data.channels),
      num_classes=getattr(module, "num_classes", 0),
      learn_sigma=getattr(module, "learn_sigma", False),
      has_null_label=getattr(module, "class_dropout_prob", 0.0) > 0)
  return model, {"checkpoint_step": step, "ema_decay": ema_decay,
                 "clip_denoised": config.sample.clip_denoised}


@contextlib.contextmanager
def _quiet_orbax():
  """Drops Orbax's INFO and WARNING records while restoring: it logs dozens of lines per restore
  and warns that a read-only manager is read-only, which would bury the CLI's own output."""
  def keep(record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname  # restore errors are ours to report

  absl_logger = std_logging.getLogger("absl")
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def pick_ema_decay(ema_params: dict, decay: float | None, default: float) -> float:
  """`decay` if the run keeps that EMA; by default the run's `default` (else its first)."""
  if not ema_params:
    raise SampleInputError("this run keeps no EMA parameters; pass --use_ema=false")
  decays = list(ema_params)
  if decay is None:
    decay = default if default in ema_params else decays[0]
  if decay not in ema_params:
    raise SampleInputError(f"--ema_decay={decay:g} is not one of this run's EMA decays {decays}")
  return decay


def check_against_model(options: SampleOptions, model: sampling.DiffusionModel) -> None:
  """Checks steps, labels and guidance against the loaded model; raises SampleInputError."""
  if options.sampler.num_steps > model.schedule.num_timesteps:
    raise SampleInputError(f"--num_steps={options.sampler.num_steps} exceeds the model's "
                           f"{model.schedule.num_timesteps} diffusion timesteps")
  if model.num_classes == 0:
    if options.labels:
      raise SampleInputError("--labels given but the model is unconditional")
    if options.sampler.guided:
      raise SampleInputError("--guidance_scale needs a class-conditional model")
    return
  if options.sampler.guided and not model.has_null_label:
    raise SampleInputError("--guidance_scale needs a model trained with label dropout (a null "
                           "label); this one has none")
  out_of_range = [label for label in options.labels if label >= model.num_classes]
  if out_of_range:
    raise SampleInputError(
        f"--labels {out_of_range} out of range: the model has {model.num_classes} classes "
        f"(0..{model.num_classes - 1})")


def output_tag(options: SampleOptions, provenance: dict[str, Any]) -> str:
  """Names the files of one run: checkpoint, weights, sampler, guidance, seed and count."""
  settings = options.sampler
  step = provenance["checkpoint_step"]
  parts = [f"step{step}" if step >= 0 else "diffusers"]
  if options.workdir is not None:
    parts.append(f"ema{provenance['ema_decay']:g}" if provenance["ema_decay"] else "raw")
  parts.append(f"{settings.method}{settings.num_steps}")
  if settings.eta:
    parts.append(f"eta{settings.eta:g}")
  if settings.guided:
    parts.append(f"cfg{settings.guidance_scale:g}")
  if settings.clip_denoised:
    parts.append("clip")
  parts += [f"seed{options.seed}", f"n{options.num_samples}"]
  return "_".join(parts)


def run(options: SampleOptions) -> dict[str, str]:
  """Loads the model, samples and writes the files (on process 0).

  Returns:
    {"npz" | "png" | "gif": path} of the files written.
  """
  check_options(options)
  model, provenance = load_model(options)
  check_against_model(options, model)
  if options.sampler.clip_denoised is None:
    options = dataclasses.replace(options, sampler=dataclasses.replace(
        options.sampler, clip_denoised=provenance["clip_denoised"]))
  labels = sampling.example_labels(options.num_samples, options.labels, model.num_classes)
  mesh = sampling.make_mesh()
  if jax.process_index() == 0:
    print(f"sampling {options.num_samples} images of shape {model.image_shape} on "
          f"{mesh.devices.size} devices", flush=True)
  samples = sampling.generate(
      sampling.make_batch_fn(model, options.sampler), model.params, mesh, labels,
      seed=options.seed, batch_size=options.batch_size)
  trajectory = None
  if options.animate:
    # The same indices, keys and labels as the first samples: the GIF ends on those images.
    animated = labels[:sampling.ANIMATION_IMAGES]
    trajectory = sampling.generate(
        sampling.make_batch_fn(model, options.sampler, trajectory=True), model.params, mesh,
        animated, seed=options.seed, batch_size=len(animated), progress=False)
  paths = output_paths(options, provenance, animate=options.animate)
  if jax.process_index() == 0:
    _write(paths, samples, labels if model.num_classes else None, trajectory,
           _metadata(options, provenance), options.animate_frames)
  return paths


def output_paths(options: SampleOptions, provenance: dict[str, Any], *,
                 animate: bool) -> dict[str, str]:
  """{"npz", "png"[, "gif"]: path} under --out (default WORKDIR/samples, or ./samples)."""
  tag = output_tag(options, provenance)
  out = options.out or os.path.join(options.workdir or ".", "samples")
  paths = {"npz": os.path.join(out, f"samples_{tag}.npz"),
           "png": os.path.join(out, f"grid_{tag}.png")}
  if animate:
    paths["gif"] = os.path.join(out, f"reverse_{tag}.gif")
  return paths


def _metadata(options: SampleOptions, provenance: dict[str, Any]) -> dict[str, Any]:
  """Scalars stored next to the samples, echoed by `python -m jaxdiff.evaluate`."""
  settings = options.sampler
  return {
      "method": settings.method, "num_steps": settings.num_steps, "eta": settings.eta,
      "spacing": settings.spacing,
      "guidance_scale": settings.guidance_scale if settings.guided else 1.0,
      "clip_denoised": settings.clip_denoised, "seed": options.seed,
      "checkpoint_step": provenance["checkpoint_step"],
      "use_ema": bool(provenance["ema_decay"]), "ema_decay": provenance["ema_decay"],
      "source": os.path.abspath(options.workdir or options.diffusers),
  }


def _write(paths, samples, labels, trajectory, metadata, animate_frames) -> None:
  sampling.write_npz(paths["npz"], samples, labels, metadata)
  images.save_png(paths["png"], images.make_grid(samples[:sampling.GRID_IMAGES]))
  if trajectory is not None:
    images.save_gif(paths["gif"], sampling.animation_frames(trajectory, animate_frames))
  for path in paths.values():
    print(f"wrote {path}", flush=True)


def define_flags() -> None:
  """Defines the CLI's flags; called at startup only, so that importing this module (tests, other
  tools with flags of the same names) defines none."""
  flags.DEFINE_string("workdir", None, "Training run to sample from (its checkpoints).")
  flags.DEFINE_string(
      "diffusers", None, "A diffusers model folder (UNet2DModel / DiTTransformer2DModel) instead.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_string("schedule", "linear", "--diffusers only: beta schedule.")
  flags.DEFINE_integer("num_timesteps", 1000, "--diffusers only: T.")
  flags.DEFINE_string("prediction", "eps", f"--diffusers only: {' | '.join(PREDICTIONS)}.")
  flags.DEFINE_integer(
      "image_size", None, "--diffusers only: image size; default: config.json sample_size.")
  flags.DEFINE_integer(
      "channels", None, "--diffusers only: image channels; default: config.json in_channels.")
  flags.DEFINE_string("method", "ddim", f"Sampler: {' | '.join(METHODS)}.")
  flags.DEFINE_integer("num_steps", 50, "Length of the timestep grid.")
  flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
  flags.DEFINE_string("spacing", "leading", f"Timestep grid: {' | '.join(SPACINGS)}.")
  flags.DEFINE_float(
      "guidance_scale", None, "Classifier-free guidance scale s; unset or 1 = no guidance.")
  flags.DEFINE_string(
      "labels", "", "Comma-separated class labels, cycled over the samples; empty cycles "
      "0..num_classes-1 (class-conditional models only).")
  flags.DEFINE_integer("num_samples", 64, "Number of samples.")
  flags.DEFINE_integer("batch_size", 64, "Samples per sampler call, all devices together.")
  flags.DEFINE_integer("seed", 0, "Sample i uses fold_in(key(seed), i).")
  flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters.")
  flags.DEFINE_float(
      "ema_decay", None, "Which EMA, when the run keeps several; default: the run's "
      "config.sample.ema_decay.")
  flags.DEFINE_string(
      "out", None, "Output folder; default: WORKDIR/samples, or ./samples with --diffusers.")
  flags.DEFINE_bool("animate", False, "Also write a GIF of the reverse process.")
  flags.DEFINE_integer("animate_frames", 20, "GIF frames (states shown).")
  flags.DEFINE_bool(
      "clip_denoised", None, "Clip the predicted x_0 to [-1, 1] in every step; default: the "
      "run's config.sample.clip_denoised (False with --diffusers).")


def options_from_flags(values: flags.FlagValues) -> SampleOptions:
  """SampleOptions from the parsed flags of `define_flags`."""
  settings = sampling.SamplerSettings(
      method=values.method, num_steps=values.num_steps, eta=values.eta, spacing=values.spacing,
      clip_denoised=values.clip_denoised, guidance_scale=values.guidance_scale)
  return SampleOptions(
      workdir=values.workdir, diffusers=values.diffusers, step=values.step,
      schedule=values.schedule, num_timesteps=values.num_timesteps,
      prediction=values.prediction, image_size=values.image_size, channels=values.channels,
      sampler=settings, labels=parse_labels(values.labels), num_samples=values.num_samples,
      batch_size=values.batch_size, seed=values.seed, use_ema=values.use_ema,
      ema_decay=values.ema_decay, out=values.out, animate=values.animate,
      animate_frames=values.animate_frames)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag value on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail((str(error).strip().splitlines() or [repr(error)])[0])
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  try:
    run(options_from_flags(flags.FLAGS))
  except (SampleInputError, FileNotFoundError) as error:
    _fail(str(error))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
