"""Training metrics: averaging per-step values on the host, NaN checks, and writers.

Step metrics stay on the device until a log (or checkpoint) boundary, so the host does not wait
for every step; they are then fetched together, checked for NaN/Inf and averaged.
"""

import json
import math
import os
from typing import Any

import jax
import numpy as np

from jaxdiff.train.step import NUM_TIME_BINS

# Metrics whose non-finite value means the state is no longer trustworthy.
_WATCHED = ("train/loss", "train/grad_norm")
# Per-step flag of train.skip_nonfinite_updates: 1.0 where the step dropped a non-finite update.
SKIPPED = "train/skipped_update"


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/Inf."""

  def __init__(self, name: str, step: int):
    super().__init__(name, step)
    self.name = name
    self.step = step


class History:
  """Per-step device metrics between two log boundaries."""

  def __init__(self):
    self._pending: list[tuple[int, dict[str, Any]]] = []  # (first step, metrics [k])

  def add(self, first_step: int, metrics: dict[str, Any]) -> None:
    """Records metrics [k] of steps first_step+1 .. first_step+k (still on the device)."""
    self._pending.append((first_step, metrics))

  def check_finite(self) -> None:
    """Raises NonFiniteLossError at the first step whose loss or grad norm is not finite.

    Steps whose update was skipped (train.skip_nonfinite_updates) left the state intact and are
    not errors.
    """
    for first_step, metrics in self._pending:
      skipped = np.asarray(jax.device_get(metrics.get(SKIPPED, 0.0))) > 0
      for name in _WATCHED:
        values = np.asarray(jax.device_get(metrics[name]))
        bad = np.flatnonzero(~np.isfinite(values) & ~skipped)
        if bad.size:
          raise NonFiniteLossError(name, first_step + int(bad[0]) + 1)

  def flush(self) -> dict[str, float]:
    """Checks, averages and clears the pending steps.

    Returns:
      {name: mean over the steps} with per-quartile loss sums turned into "train/loss_q{q}"
      means (quartiles never drawn are left out); empty if nothing is pending. With skipped
      updates, "train/skipped_updates" counts them and the means cover the other steps only.
    """
    self.check_finite()
    if not self._pending:
      return {}
    fetched = jax.device_get([m for _, m in self._pending])
    self._pending = []
    stacked = {k: np.concatenate([np.reshape(m[k], -1) for m in fetched]) for k in fetched[0]}
    skipped = stacked.pop(SKIPPED, np.zeros(1)) > 0
    if SKIPPED in fetched[0]:
      stacked = {k: v[~skipped] for k, v in stacked.items()}
    out = {"train/skipped_updates": float(np.sum(skipped))} if SKIPPED in fetched[0] else {}
    for name, values in stacked.items():
      if not name.endswith(("_sum", "_count")) and values.size:
        out[name] = float(np.mean(values))
    for q in range(NUM_TIME_BINS):
      if f"train/loss_q{q}_count" not in stacked:  # an autoencoder run has no timesteps
        continue
      count = float(np.sum(stacked[f"train/loss_q{q}_count"]))
      if count > 0:
        out[f"train/loss_q{q}"] = float(np.sum(stacked[f"train/loss_q{q}_sum"])) / count
    return out


class MetricsWriter:
  """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tensorboard = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Writes one line {"step": step, **metrics}; non-finite values are written as null."""
    if not self.enabled or not metrics:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for name, value in clean.items():
      if value is not None:
        self._tensorboard.add_scalar(name, value, int(step))
    self._tensorboard.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Adds a uint8 [H, W, C] image to TensorBoard."""
    if self.enabled:
      self._tensorboard.add_image(name, image, int(step), dataformats="HWC")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
