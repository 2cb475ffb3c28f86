"""The training loop: validate, restore or initialise, then step, log, sample and checkpoint.

`train(config_dict, workdir)` is what `python -m jaxdiff.train` calls. Every process runs the same
control flow (multi-host); only process 0 writes metrics and sample grids. All validation
happens before anything is written into the workdir.
"""

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from jaxdiff import images
from jaxdiff.config import Config, check_run, parse_config
from jaxdiff.data import DatasetInfo, dataset_info, make_train_iterator
from jaxdiff.diffusion import make_schedule
from jaxdiff.train import checkpoint
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import preview as preview_lib
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

# fold_in constants of the run's root key: one stream per use.
INIT_STREAM, TRAIN_STREAM, PREVIEW_STREAM, FID_STREAM = 0, 1, 2, 3


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the message says what is kept."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM (or a multi-host preemption notice) arrived; the state was saved at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped by SIGTERM at step {step} after saving a checkpoint; "
                     "run the same command again to resume")
    self.step = step


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything derived from the config before training starts (no arrays allocated)."""
  config_dict: ml_collections.ConfigDict
  config: Config
  info: DatasetInfo
  mesh: Mesh
  model: Any
  tx: Any
  lr_schedule: Any
  abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
  shardings: Any


def prepare(config_dict: ml_collections.ConfigDict,
            devices: Sequence[jax.Device] | None = None) -> Run:
  """Validates the config against the data and devices and builds model, optimizer and mesh.

  Raises:
    ConfigError, DatasetNotFoundError: with a one-line message, before any file is written.
  """
  config = parse_config(config_dict)
  info = dataset_info(config.data)
  devices = list(jax.devices() if devices is None else devices)
  check_run(config, info, len(devices), jax.process_count())
  mesh = sharding_lib.make_mesh(config.mesh.fsdp, devices)
  shardings_fn = lambda tree: sharding_lib.state_shardings(mesh, tree, config.mesh.fsdp_min_size)
  model, tx, lr_schedule, shapes = checkpoint.abstract_state(config, info, shardings_fn)
  return Run(config_dict=config_dict, config=config, info=info, mesh=mesh, model=model, tx=tx,
             lr_schedule=lr_schedule, abstract_state=shapes,
             shardings=jax.tree.map(lambda s: s.sharding, shapes))


def root_key(seed: int, stream: int, mesh: Mesh) -> jax.Array:
  """fold_in(key(seed), stream), replicated on the mesh (same value on every process)."""
  return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), stream),
                 out_shardings=sharding_lib.replicated(mesh))()


def init_state(run: Run) -> state_lib.TrainState:
  """Fresh state created directly with its shardings (never materialised on one device)."""
  config = run.config
  init = state_lib.init_params_fn(run.model, run.info.image_size, run.info.channels,
                                  config.model.class_conditional)
  create = lambda: state_lib.create_state(
      init, run.tx, config.train.ema_decays,
      jax.random.fold_in(jax.random.key(config.seed), INIT_STREAM))
  return jax.jit(create, out_shardings=run.shardings)()


def make_step_fn(run: Run):
  """The jitted k-step function of this run (see step.jit_train_step)."""
  config = run.config
  return step_lib.jit_train_step(
      run.mesh, run.shardings, apply_fn=run.model.apply, tx=run.tx,
      lr_schedule=run.lr_schedule, schedule=make_schedule(
          config.diffusion.schedule, config.diffusion.num_timesteps),
      diffusion=config.diffusion, conditional=config.model.class_conditional,
      learn_sigma=config.model.learn_sigma, ema_decays=config.train.ema_decays,
      skip_nonfinite=config.train.skip_nonfinite_updates)


def next_batches(iterator, k: int, sharding) -> dict[str, jax.Array]:
  """k local batches stacked to [k, B_local, ...] and assembled into global arrays [k, B, ...]."""
  local = [next(iterator) for _ in range(k)]
  stacked = {name: np.stack([b[name] for b in local]) for name in ("image", "label")}
  return sharding_lib.global_batch(stacked, sharding)


class PreemptionGuard:
  """Notices SIGTERM. One process: a signal handler sets a flag. Several processes: JAX's
  preemption sync point, so every host stops at the same step."""

  def __init__(self, manager):
    self._manager = manager
    self._requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._requested = True

  def should_stop(self, dispatch_index: int) -> bool:
    if self._multi:
      return bool(self._manager.reached_preemption(dispatch_index))
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def restore_or_init(run: Run, manager, resolved: dict) -> tuple[state_lib.TrainState, dict | None]:
  """The latest checkpoint of the workdir (checked and resharded), or a fresh state."""
  latest = manager.latest_step()
  if latest is None:
    return init_state(run), None
  return checkpoint.restore(manager, latest, run.abstract_state, resolved)


def train(config_dict: ml_collections.ConfigDict, workdir: str, *,
          devices: Sequence[jax.Device] | None = None) -> state_lib.TrainState:
  """Trains (or resumes) the run in `workdir` to `config.train.num_steps`.

  Args:
    config_dict: the ConfigDict of configs/base.py (with overrides applied).
    workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, samples/.
    devices: devices of the mesh (default: all); tests pass a subset.

  Returns:
    The final train state.

  Raises:
    ConfigError, DatasetNotFoundError, CheckpointError: before anything is written.
    TrainingError: the loss became NaN/Inf (the last good checkpoint is kept).
    Preempted: SIGTERM arrived; the state was saved first.
  """
  run = prepare(config_dict, devices)
  fid = _make_fid(run) if run.config.eval.fid_every else None  # weight errors before any write
  resolved = checkpoint.resolved_config(config_dict, run.config, run.info)
  if os.path.exists(checkpoint.checkpoint_dir(workdir)):
    with contextlib.closing(checkpoint.open_manager(workdir, read_only=True)) as reader:
      state, data_state = restore_or_init(run, reader, resolved)
  else:
    state, data_state = init_state(run), None
  iterator = make_train_iterator(
      run.config.data, global_batch_size=run.config.train.batch_size, seed=run.config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if data_state is not None:
    try:
      iterator.set_state(data_state)
    except ValueError as error:
      raise checkpoint.CheckpointError(f"cannot resume the data position: {error}") from None
  manager = checkpoint.open_manager(workdir, run.config.checkpoint)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  guard = PreemptionGuard(manager)
  try:
    return _loop(run, workdir, manager, writer, guard, state, iterator, resolved, fid)
  finally:
    guard.close()
    writer.close()
    checkpoint.wait_until_finished(manager)
    manager.close()
    iterator.close()


def _loop(run: Run, workdir: str, manager, writer, guard, state, iterator, resolved, fid=None):
  """Steps until num_steps, logging, sampling and checkpointing at their boundaries."""
  cfg = run.config
  k = cfg.train.steps_per_dispatch
  step = int(jax.device_get(state.step))
  key = root_key(cfg.seed, TRAIN_STREAM, run.mesh)
  batch_sharding = sharding_lib.batch_sharding(run.mesh, leading_dims=1)
  preview = _make_preview(run) if cfg.train.sample_every else None
  history = metrics_lib.History()
  timer = _Timer(step)
  compiled = None
  bar = tqdm.tqdm(total=cfg.train.num_steps, initial=step, unit="step", dynamic_ncols=True,
                  disable=not (cfg.train.progress_bar and jax.process_index() == 0))
  try:
    while step < cfg.train.num_steps:
      batches = next_batches(iterator, k, batch_sharding)
      if compiled is None:
        compiled = _compile(make_step_fn(run), (state, batches, key), writer, step)
        timer.reset(step)
      state, step_metrics = compiled(state, batches, key)
      history.add(step, step_metrics)
      step += k
      bar.update(k)
      if step % cfg.train.log_every == 0 or step == cfg.train.num_steps:
        _log(history, writer, timer, step, cfg.train.batch_size, bar)
        writer.write(step, iterator.stats())
      if preview is not None and step % cfg.train.sample_every == 0:
        with timer.paused():
          _save_preview(preview, state, workdir, writer, step, cfg)
      if fid is not None and step % cfg.eval.fid_every == 0:
        with timer.paused():
          writer.write(step, fid(state))
      stop = guard.should_stop(step // k)
      if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.num_steps or stop:
        with timer.paused():
          history.check_finite()
          checkpoint.save(manager, step, state, iterator.get_state(), resolved, force=True)
      if stop and step < cfg.train.num_steps:
        checkpoint.wait_until_finished(manager)
        raise Preempted(step)
  except metrics_lib.NonFiniteLossError as error:
    checkpoint.wait_until_finished(manager)
    last = manager.latest_step()
    raise TrainingError(
        f"{error.name.removeprefix('train/')} became NaN/Inf at step {error.step}; "
        f"last good checkpoint is step {last if last is not None else 'none (none saved yet)'}; "
        "lower optimizer.learning_rate or set optimizer.grad_clip_norm") from None
  finally:
    bar.close()
  return state


def _compile(step_fn, args, writer, step: int):
  """Ahead-of-time compiles the step so its time is logged apart from steps/s."""
  start = time.perf_counter()
  compiled = step_fn.lower(*args).compile()
  writer.write(step, {"train/compile_seconds": time.perf_counter() - start})
  return compiled


class _Timer:
  """Wall time of training steps only (compilation, sampling and saving excluded)."""

  def __init__(self, step: int):
    self.reset(step)

  def reset(self, step: int) -> None:
    self._start, self._step, self._paused = time.perf_counter(), step, 0.0

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def steps_per_second(self, step: int) -> float:
    elapsed = time.perf_counter() - self._start - self._paused
    return (step - self._step) / max(elapsed, 1e-9)


def _log(history, writer, timer, step: int, batch_size: int, bar) -> None:
  values = history.flush()  # blocks on the device: the timing below covers finished steps
  steps_per_second = timer.steps_per_second(step)
  values["train/steps_per_sec"] = steps_per_second
  values["train/images_per_sec"] = steps_per_second * batch_size
  writer.write(step, values)
  bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
  timer.reset(step)


def _make_preview(run: Run):
  cfg = run.config
  ema = state_lib.ema_key(cfg.sample.ema_decay)
  fn = preview_lib.make_preview_fn(
      run.model, make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps), cfg,
      run.info, run.mesh, run.shardings.ema_params[ema],
      root_key(cfg.seed, PREVIEW_STREAM, run.mesh))
  return lambda state: fn(state.ema_params[ema])


def _make_fid(run: Run):
  """state -> {"eval/fid": ...}: proxy FID of `eval.num_samples` EMA samples (sample settings).

  Samples are drawn in chunks of `sample.num_images` consecutive global indices, against the
  reference statistics in `eval.reference_stats`.
  """
  from jaxdiff.eval import FidEvaluator  # pylint: disable=g-import-not-at-top  (heavy, optional)
  cfg = run.config
  evaluator = FidEvaluator(cfg.eval.inception_weights or None, cfg.eval.reference_stats)
  ema = state_lib.ema_key(cfg.sample.ema_decay)
  key = root_key(cfg.seed, FID_STREAM, run.mesh)
  generate = preview_lib.make_preview_fn(
      run.model, make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps), cfg,
      run.info, run.mesh, run.shardings.ema_params[ema], key)
  num_chunks = -(-cfg.eval.num_samples // cfg.sample.num_images)

  def evaluate(state) -> dict[str, float]:
    chunks = [generate(state.ema_params[ema], c * cfg.sample.num_images)
              for c in range(num_chunks)]
    samples = images.to_uint8(np.concatenate(chunks)[:cfg.eval.num_samples])
    scores = evaluator.score(samples, names=("fid",))
    return {"eval/fid": float(scores["fid"]), "eval/fid_num_samples": len(samples)}
  return evaluate


def _save_preview(preview, state, workdir: str, writer, step: int, cfg: Config) -> None:
  samples = preview(state)
  if jax.process_index() == 0:
    _, grid = preview_lib.save_grid(workdir, step, samples)
    writer.write_image(step, f"samples/ema_{cfg.sample.ema_decay}", grid)
