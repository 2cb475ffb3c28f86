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
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from jaxdiff.data import make_train_iterator
from jaxdiff.data.pipeline import TrainIterator
from jaxdiff.train import checkpoint
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import preview as preview_lib
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train.builder import TRAIN_STREAM, Run, build_run, init_state, make_step_fn, root_key
from jaxdiff.train.fid import make_fid_fn
from jaxdiff.train.preview import make_preview_fn

class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the message says what is kept."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM (or a multi-host preemption notice) arrived; the state was saved at `step`."""

  def __init__(self, step: int):
    super().__init__(f"stopped by SIGTERM at step {step} after saving a checkpoint; "
                     "run the same command again to resume")
    self.step = step


def next_batches(iterator, k: int, sharding) -> dict[str, jax.Array]:
  """k local batches stacked to [k, B_local, ...] and assembled into global arrays [k, B, ...].

  The train step's "image" is the data the diffusion runs on: the images, or the cached
  autoencoder latents of a `latents` source (so the encoder never runs in the step); cached
  caption embeddings travel as "context".
  """
  local = [next(iterator) for _ in range(k)]
  data = "latent" if "latent" in local[0] else "image"
  stacked = {"image": np.stack([b[data] for b in local]),
             "label": np.stack([b["label"] for b in local])}
  if "context" in local[0]:
    stacked["context"] = np.stack([b["context"] for b in local])
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


def restore_or_init(run: Run, manager: ocp.CheckpointManager,
                    resolved: dict) -> tuple[state_lib.TrainState, dict | None]:
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
  run = build_run(config_dict, devices=devices)
  fid = make_fid_fn(run) if run.config.eval.fid_every else None  # weight errors before any write
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
  session = _Session(run=run, workdir=workdir, manager=manager, writer=writer,
                     guard=PreemptionGuard(manager), iterator=iterator, resolved=resolved,
                     preview=make_preview_fn(run) if run.config.train.sample_every else None,
                     fid=fid)
  try:
    return _loop(session, state)
  finally:
    session.guard.close()
    writer.close()
    checkpoint.wait_until_finished(manager)
    manager.close()
    iterator.close()


@dataclasses.dataclass(frozen=True)
class _Session:
  """What the loop works with besides the state: the run and its open files and hooks."""
  run: Run
  workdir: str
  manager: ocp.CheckpointManager
  writer: metrics_lib.MetricsWriter
  guard: PreemptionGuard
  iterator: TrainIterator
  resolved: dict[str, Any]  # the config JSON saved with each checkpoint
  preview: Callable[[state_lib.TrainState], np.ndarray] | None  # EMA sample grid
  fid: Callable[[state_lib.TrainState], dict[str, float]] | None  # proxy FID


def _loop(session: _Session, state: state_lib.TrainState) -> state_lib.TrainState:
  """Steps until num_steps, logging, sampling and checkpointing at their boundaries."""
  run, manager, writer, iterator = session.run, session.manager, session.writer, session.iterator
  cfg = run.config
  k = cfg.train.steps_per_dispatch
  step = int(jax.device_get(state.step))
  key = root_key(cfg.seed, TRAIN_STREAM, run.mesh)
  batch_sharding = sharding_lib.batch_sharding(run.mesh, leading_dims=1)
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
      if session.preview is not None and step % cfg.train.sample_every == 0:
        with timer.paused():
          _save_preview(session, state, step)
      if session.fid is not None and step % cfg.eval.fid_every == 0:
        with timer.paused():
          writer.write(step, session.fid(state))
      stop = session.guard.should_stop(step // k)
      if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.num_steps or stop:
        with timer.paused():
          history.check_finite()
          checkpoint.save(manager, step, state, iterator.get_state(), session.resolved,
                          force=True)
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


def _save_preview(session: _Session, state: state_lib.TrainState, step: int) -> None:
  samples = session.preview(state)
  if jax.process_index() == 0:
    _, grid = preview_lib.save_grid(session.workdir, step, samples)
    session.writer.write_image(step, f"samples/ema_{session.run.config.sample.ema_decay}", grid)
