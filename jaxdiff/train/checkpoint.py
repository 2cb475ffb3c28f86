"""Orbax checkpoints: save, restore onto any mesh, refuse incompatible or unreadable ones.

A checkpoint step under `WORKDIR/checkpoints/<step>` holds three items:
  "state"  the TrainState pytree (params, EMA params, optimizer state, step),
  "data"   the data iterator position (JSON),
  "config" the resolved config (JSON): the full ConfigDict, the dataset description, the model
           signature used to refuse a checkpoint written for another model and, for a latent
           run, the scale of its cached latents ("latents", which decoding must undo).
Orbax writes each step into a temporary directory (`<step>.orbax-checkpoint-tmp*`) and renames
it when complete, so a crash mid-save leaves the previous checkpoints intact; temporaries are
never listed as steps, and a writable manager deletes the ones a killed run left behind. A save
that fails (e.g. a full disk) is reported as one CheckpointError naming the intact step. Nothing
here deletes or rewrites an existing step: an unreadable latest checkpoint is reported, not
replaced.
"""

import dataclasses
import os
import re
import sys
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxdiff.config import Config, CheckpointConfig, ConfigError, jsonable, parse_config, to_dict
from jaxdiff.data import DatasetInfo
from jaxdiff.data import latents as latents_lib
from jaxdiff.models import AutoencoderKL
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib

# Model fields that change the computation but not the parameters; they may differ on resume.
_NON_STRUCTURAL = ("overrides.remat", "overrides.dropout", "dtype")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (unreadable, or written for another model)."""


class SaveError(CheckpointError):
  """Writing a checkpoint failed (e.g. a full disk); the earlier finished steps are intact."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def open_manager(workdir: str, config: CheckpointConfig | None = None, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Opens (and, unless `read_only`, creates) the checkpoint directory of `workdir`.

  Args:
    workdir: the run directory.
    config: keep-last-N and async options; None for reading only.
    read_only: never create, save or delete anything.
  """
  if not read_only:
    _quiet_abandoned_writes()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_to_keep if config else None,
      enable_async_checkpointing=bool(config and config.async_save),
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data", "config"))


def _quiet_abandoned_writes() -> None:
  """Drops the "Event loop is closed" reports of writes abandoned by a failed save.

  When one write of an asynchronous save fails (a full disk), Orbax stops its event loop while
  TensorStore still completes the step's other writes; each completion's callback into the closed
  loop is reported as an unraisable exception (hundreds of tracebacks around the one-line
  SaveError). Only that exact report is dropped; every other one reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_jaxdiff_quiet", False):
    return

  def hook(unraisable):
    frames = []
    tb = unraisable.exc_traceback
    while tb is not None:
      frames.append(tb.tb_frame.f_code)
      tb = tb.tb_next
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"
            and frames and frames[-1].co_name == "_check_closed"
            and frames[-1].co_filename.endswith(os.path.join("asyncio", "base_events.py"))):
      previous(unraisable)

  hook._jaxdiff_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def resolved_config(config_dict: ml_collections.ConfigDict, config: Config,
                    info: DatasetInfo) -> dict[str, Any]:
  """The JSON stored with each checkpoint."""
  resolved = {"config": to_dict(config_dict), "dataset": dataclasses.asdict(info),
              "signature": model_signature(config, info)}
  if config.data.source == "latents" and config.task == "diffusion":
    stored = latents_lib.read_latents_info(config.data.latents_dir)
    resolved["latents"] = {key: stored[key] for key in LATENT_SCALE_KEYS}
  return resolved


LATENT_SCALE_KEYS = ("latent_shape", "scaling_factor", "shift_factor")


def model_signature(config: Config, info: DatasetInfo) -> dict[str, Any]:
  """Fields that must match for a checkpoint's state to fit this run's model."""
  signature = {
      "model.name": config.model.name,
      "model.class_conditional": config.model.class_conditional,
      "model.class_dropout_prob > 0": config.model.class_dropout_prob > 0,
      "model.learn_sigma": config.model.learn_sigma,
      # The same weights mean another function under another objective (eps / velocity / EDM).
      "diffusion.objective": config.diffusion.objective,
      "data.image_size": info.image_size,
      "data.channels": info.channels,
      "dataset num_classes": info.num_classes if config.model.class_conditional else 0,
      "train.ema_decays": config.train.ema_decays,
  }
  for field, value in sorted(config.model.overrides.items()):
    if f"overrides.{field}" not in _NON_STRUCTURAL:
      signature[f"model.overrides.{field}"] = value
  if config.text.enabled:  # the pipeline U-Net's layout (its weights may change on resume)
    model = state_lib.make_model(config, info)
    signature["text.pipeline U-Net"] = repr(sorted(
        (f.name, getattr(model, f.name)) for f in dataclasses.fields(model)
        if f.name not in ("dropout", "dtype", "param_dtype", "parent", "name")))
  # As it comes back from the checkpoint's JSON (tuples as lists), so the two compare equal.
  return jsonable(signature)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """Raises CheckpointError naming every signature field that differs."""
  saved_signature = saved.get("signature", {})
  current_signature = current["signature"]
  keys = sorted(set(saved_signature) | set(current_signature))
  differences = [f"{key}={saved_signature.get(key)!r} there vs {current_signature.get(key)!r} here"
                 for key in keys if saved_signature.get(key) != current_signature.get(key)]
  if differences:
    raise CheckpointError(
        f"{where} was written for a different model ({'; '.join(differences)}); "
        "use the config it was trained with, or a new --workdir")


def save(manager: ocp.CheckpointManager, step: int, state: state_lib.TrainState,
         data_state: dict[str, Any], resolved: dict[str, Any], *, force: bool = False) -> bool:
  """Starts saving (asynchronously if configured) step `step`; returns whether it saves.

  Raises:
    CheckpointError: this save, or the previous asynchronous one, failed (e.g. disk full).
  """
  try:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(resolved)), force=force)
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise _save_failed(manager, step, error) from None


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Waits for an asynchronous save; CheckpointError (one line) if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise _save_failed(manager, None, error) from None


def finished_steps(directory: str) -> list[int]:
  """Steps whose directory is complete (Orbax renames a step's temporary directory last)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _save_failed(manager: ocp.CheckpointManager, step: int | None,
                 error: Exception) -> SaveError:
  if isinstance(error, SaveError):
    return error
  # An asynchronous save's error surfaces at a later call: the temporary path names its step.
  found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(error))
  step = int(found.group(1)) if found else step
  intact = [s for s in finished_steps(str(manager.directory)) if s != step]
  kept = (f"checkpoint step {max(intact)} is intact" if intact else "no earlier checkpoint exists")
  reason = " ".join((str(error).strip().splitlines() or [""])[0].split())[:200]
  fix = ("another task died: a peer process stopped while the hosts were saving together; "
         "restart every process with the same command to resume" if _peer_died(error)
         else "free space (or fix the cause) and run the same command again to resume")
  return SaveError(
      f"saving checkpoint {'' if step is None else f'step {step} '}in {manager.directory} failed "
      f"({type(error).__name__}: {reason}); {kept}: {fix}")


# How a multi-host save reports a dead peer: JAX's coordination service, or the collective
# (gloo on CPU) that Orbax runs across hosts when the peer's socket closes.
_PEER_DIED = ("another task died", "connection reset by peer", "connection closed by peer",
              "gloo allgather failed", "gloo allreduce failed", "gloo broadcast failed")


def _peer_died(error: Exception) -> bool:
  return jax.process_count() > 1 and any(m in str(error).lower() for m in _PEER_DIED)


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointError:
  earlier = [s for s in manager.all_steps() if s < step]
  hint = (f"move it aside (mv {_step_path(manager, step)} {_step_path(manager, step)}.bad) to "
          f"resume from step {max(earlier)}" if earlier else "move it aside to start afresh")
  reason = (str(error).strip().splitlines() or [""])[0][:200]
  return CheckpointError(
      f"checkpoint step {step} at {_step_path(manager, step)} is unreadable "
      f"({type(error).__name__}: {reason}); it was left untouched: {hint}")


def read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The resolved-config JSON of a step (CheckpointError if unreadable)."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = restored["config"]
    if not isinstance(saved, dict) or "config" not in saved:
      raise ValueError("the config item is not a jaxdiff resolved config")
    return saved
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise _unreadable(manager, step, error) from None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            current: dict[str, Any] | None) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Restores step `step` onto the shardings of `abstract_state`.

  Args:
    manager: the checkpoint manager.
    step: step to restore.
    abstract_state: TrainState of `jax.ShapeDtypeStruct`s with `.sharding` set (the current mesh),
      so a checkpoint written on any device count is resharded on load.
    current: this run's resolved config, checked against the saved one (None skips the check).

  Returns:
    (state, data iterator state).

  Raises:
    CheckpointError: incompatible config, or unreadable files.
  """
  saved = read_config(manager, step)
  if current is not None:
    check_compatible(saved, current, f"checkpoint step {step} at {_step_path(manager, step)}")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    state = restored["state"]
    if int(jax.device_get(state.step)) != step:
      raise ValueError(f"the state inside holds step {int(state.step)}")
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise _unreadable(manager, step, error) from None
  return state, restored["data"]


def saved_dataset_info(workdir: str, step: int) -> DatasetInfo:
  """The description of the data a checkpoint was trained on (the latents' for cached latents:
  the shape of what the model denoises)."""
  manager = open_manager(workdir, read_only=True)
  try:
    return DatasetInfo(**read_config(manager, step)["dataset"])
  finally:
    manager.close()


def restore_for_inference(workdir: str, step: int | None = None):
  """Loads a training checkpoint for sampling, replicated on every device.

  Args:
    workdir: the training run's directory (the one given as --workdir).
    step: checkpoint step; None for the latest.

  Returns:
    (config, model, params, ema_params): the parsed `Config` (with `data.channels` resolved to
    the dataset's; a latent run's latent shape is the checkpoint config's "latents" entry), the
    Flax module, the raw params and {decay (float): EMA params}.

  Raises:
    CheckpointError: no checkpoint, or unreadable.
  """
  manager = open_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise CheckpointError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{checkpoint_dir(workdir)}; available: {list(manager.all_steps())}")
    saved = read_config(manager, step)
    try:
      config = parse_config(ml_collections.ConfigDict(saved["config"]))
    except ConfigError as error:
      raise CheckpointError(f"checkpoint step {step} has an invalid config: {error}") from None
    info = DatasetInfo(**saved["dataset"])
    if config.data.source != "latents":  # a latent run's data section describes its images
      config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                    channels=info.channels))
    replicated = sharding_lib.replicated(sharding_lib.make_mesh(1))
    model = state_lib.make_model(config, info)
    tx, _ = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
    shapes = state_lib.abstract_state(model, tx, config, info)
    shapes = sharding_lib.with_shardings(shapes, jax.tree.map(lambda _: replicated, shapes))
    state, _ = restore(manager, step, shapes, None)
  finally:
    manager.close()
  ema = {decay: state.ema_params[state_lib.ema_key(decay)] for decay in config.train.ema_decays}
  return config, model, state.params, ema


def load_autoencoder(path: str, field: str = "config.autoencoder.path") -> tuple[AutoencoderKL, Any]:
  """(module, params) of an autoencoder: a jaxdiff autoencoder run (task=autoencoder; the EMA
  params of its config.sample.ema_decay at its latest checkpoint) or a diffusers AutoencoderKL
  folder (config.json + safetensors).

  Args:
    path: the run's workdir or the diffusers folder.
    field: what `path` was given as, named in errors (a config field or a flag).

  Raises:
    CheckpointError: one line naming `field`: no such folder, neither kind, or unreadable.
  """
  if os.path.isdir(checkpoint_dir(path)):
    config, module, _, ema_params = restore_for_inference(path)
    if config.task != "autoencoder":
      raise CheckpointError(f"{field}={path!r} is a {config.task} run, not an autoencoder run "
                            "(task='autoencoder')")
    return module, ema_params[config.sample.ema_decay]
  if os.path.isfile(os.path.join(path, "config.json")):
    from jaxdiff.convert import load_diffusers  # pylint: disable=g-import-not-at-top
    try:
      module, params = load_diffusers(path)
    except (ValueError, KeyError, OSError) as error:
      raise CheckpointError(f"{field}={path!r} cannot be loaded: {error}") from None
    if not isinstance(module, AutoencoderKL):
      raise CheckpointError(f"{field}={path!r} holds a {type(module).__name__}, not an "
                            "AutoencoderKL")
    return module, params
  problem = "does not exist" if not os.path.isdir(path) else (
      "is neither a jaxdiff autoencoder run (no checkpoints/) nor a diffusers AutoencoderKL "
      "folder (no config.json)")
  raise CheckpointError(f"{field}={path!r} {problem}; train one (configs/mnist_autoencoder.py) "
                        "or give a diffusers AutoencoderKL folder")


def load_latent_autoencoder(path: str, latents: Mapping[str, Any],
                            field: str = "config.autoencoder.path") -> tuple[AutoencoderKL, Any]:
  """The autoencoder of a latent run, at the scale of its cached latents.

  Its `scaling_factor` and `shift_factor` become those the latents were stored with, so that
  decoding undoes exactly the scale the diffusion model was trained on.

  Args:
    path: see `load_autoencoder`.
    latents: the latents' `latent_shape`, `scaling_factor` and `shift_factor` (a latents.json,
      or the copy in a latent run's checkpoint).
    field: what `path` was given as, named in errors.

  Raises:
    CheckpointError: the autoencoder cannot be loaded, or its latents are not those cached.
  """
  module, params = load_autoencoder(path, field)
  channels = latents["latent_shape"][-1]
  if channels != module.latent_channels:
    raise CheckpointError(
        f"the cached latents have {channels} channels but {field}={path!r} makes "
        f"{module.latent_channels}: name the autoencoder that encoded them, or encode the data "
        f"with this one (python -m jaxdiff.data.encode --autoencoder={path})")
  return module.clone(scaling_factor=float(latents["scaling_factor"]),
                      shift_factor=float(latents["shift_factor"])), params
