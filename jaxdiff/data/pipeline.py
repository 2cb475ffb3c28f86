"""Grain pipelines: the resumable, process-sharded training stream and one-pass iteration.

The training stream is a sequence of global example positions g = 0, 1, 2, ... . Position g
belongs to epoch e = g // N (N examples) and reads example `permutation(seed, e)[g % N]`, flipped
when a hash of (seed, g) says so. Global batch s holds positions [s*B, (s+1)*B); process p reads
only rows [p*B_local, (p+1)*B_local) of it. Nothing depends on the process count, the number of
grain workers or threads, or on where a run was resumed, so a 2-process run sees bit-identical
data to a 1-process run, and a resumed run sees the same batches as an uninterrupted one.
Cached latents (source "latents") go through the same stream; see `latents.py`.
"""
from collections.abc import Iterator
import os
import threading

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from jaxdiff.data.config import BadRecordError
from jaxdiff.data.config import DataConfig
from jaxdiff.data.config import DatasetInfo
from jaxdiff.data.latents import LatentSource
from jaxdiff.data.sources import ImageSource
from jaxdiff.data.sources import open_source
from jaxdiff.data.sources import stack_examples

_MASK64 = (1 << 64) - 1
_SHUFFLE_STREAM = 0x73687566  # Separates the shuffle and flip randomness of one seed.
_FLIP_STREAM = 0x666C6970
# The stream is infinite in practice: 2**62 positions are never exhausted.
_END = 1 << 62
# Test-only fault injection: the global batch with this index has NaN images (poisons one step).
POISON_BATCH_ENV = "JAXDIFF_TEST_POISON_BATCH"


def dataset_info(cfg: DataConfig) -> DatasetInfo:
  """Image size, channels, number of classes and examples of the configured dataset."""
  source = open_source(cfg)
  return DatasetInfo(image_size=source.image_size, channels=source.channels,
                     num_classes=source.num_classes, num_examples=len(source))


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in one epoch: int64 [num_examples], from (seed, epoch) only."""
  rng = np.random.default_rng([seed & _MASK64, _SHUFFLE_STREAM, epoch])
  return rng.permutation(num_examples)


def flip_bit(seed: int, position: int) -> bool:
  """Whether the example at a global position is flipped: splitmix64 of (seed, position)."""
  x = _splitmix64(_splitmix64(seed ^ _FLIP_STREAM) + position)
  return bool(x >> 63)


def _splitmix64(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


class _GlobalPosition:
  """Maps a process's local example position to the global one."""

  def __init__(self, global_batch_size: int, local_batch_size: int, process_index: int):
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.process_index = process_index

  def __call__(self, local_position: int) -> int:
    step, row = divmod(int(local_position), self.local_batch_size)
    return step * self.global_batch_size + self.process_index * self.local_batch_size + row


class _ReadExample:
  """Reads the (shuffled, maybe flipped) example at a global position."""

  def __init__(self, source: ImageSource | LatentSource, seed: int, random_flip: bool,
               skip_bad: bool = False):
    self.source, self.seed, self.random_flip = source, seed, random_flip
    self.num_examples = len(source)
    self._permutations = {}
    self._skip_bad = skip_bad
    self._lock = threading.Lock()
    self.skipped = 0  # bad records replaced in this process (reader threads included)

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = epoch_permutation(self.seed, epoch, self.num_examples)
      # Replaced whole (not mutated) so reader threads never see a half-updated cache; it keeps
      # the two epochs that a batch can straddle.
      self._permutations = {**dict(list(self._permutations.items())[-1:]), epoch: permutation}
    return permutation

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    epoch, offset = divmod(position, self.num_examples)
    flip = self.random_flip and flip_bit(self.seed, position)
    return self._read_or_skip(self._permutation(epoch), offset, flip, position)

  def __getstate__(self):  # grain pickles the reader into its worker processes
    return {**self.__dict__, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _read_or_skip(self, permutation: np.ndarray, offset: int, flip: bool,
                    position: int) -> dict[str, np.ndarray]:
    """The example at `offset` of the epoch; with skip_bad, the next readable one after it.

    The replacement depends on the position only, so a resumed run reads the same examples.
    """
    for attempt in range(self.num_examples):
      index = int(permutation[(offset + attempt) % self.num_examples])
      try:
        return self.source.training_example(index, flip, self.seed, position)
      except BadRecordError as error:
        if not self._skip_bad:
          raise
        with self._lock:
          self.skipped += 1
        logging.warning("skipped a bad record: %s", error)
    raise BadRecordError("every record of the dataset is unreadable")


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator over one process's rows of the global training batches.

  Yields `{"image": float32 [B_local, H, W, C] in [-1, 1], "label": int32 [B_local]}`, or
  `{"latent": float32 [B_local, h, w, c], "label"}` for cached latents. Its state
  is the index of the next global batch; `set_state` rebuilds the grain pipeline from there.
  """

  def __init__(self, cfg: DataConfig, source: ImageSource | LatentSource, *,
               global_batch_size: int, seed: int,
               process_index: int, process_count: int):
    self.cfg, self.seed, self.global_batch_size = cfg, seed, global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._to_global = _GlobalPosition(global_batch_size, self.local_batch_size, process_index)
    self._read = _ReadExample(source, seed, cfg.random_flip, cfg.skip_bad_records)
    self._next_batch = 0
    self._iterator = None
    self._poison_batch = int(os.environ.get(POISON_BATCH_ENV, -1))

  def _start(self):
    first = self._next_batch * self.local_batch_size
    dataset = (grain.MapDataset.range(first, _END).map(self._to_global).map(self._read)
               .batch(self.local_batch_size, batch_fn=self._read.source.training_batch))
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=self.cfg.num_threads, prefetch_buffer_size=self.cfg.prefetch))
    if self.cfg.num_workers:
      # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) none
      # were parsed, and the defaults are what we want.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Workers slice the dataset of whole batches, so batches do not depend on the worker count.
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.cfg.num_workers, per_worker_buffer_size=self.cfg.prefetch))
    return iter(dataset)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start()
    batch = next(self._iterator)
    if self._next_batch == self._poison_batch:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    self._next_batch += 1
    return batch

  @property
  def skipped_records(self) -> int:
    """Bad records replaced so far in this process (data.skip_bad_records; the offline digits'
    dropped rows included; not counted inside grain worker processes)."""
    return self._read.skipped + getattr(self._read.source, "skipped_rows", 0)

  def stats(self) -> dict[str, float]:
    """{"data/skipped_records": count} when skip_bad_records is on, else {} (for the metrics)."""
    if not self.cfg.skip_bad_records:
      return {}
    return {"data/skipped_records": float(self.skipped_records)}

  def get_state(self) -> dict[str, int]:
    """JSON-able position: the next global batch, and what it means (batch size and seed)."""
    return {"next_batch": self._next_batch, "global_batch_size": self.global_batch_size,
            "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a `get_state()` result, taken with any process count."""
    for key in ("global_batch_size", "seed"):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(f"data iterator state has {key}={state[key]}, but this iterator was "
                         f"built with {key}={getattr(self, key)}")
    next_batch = int(state["next_batch"])
    if next_batch < 0:
      raise ValueError(f"data iterator state has next_batch={next_batch} < 0")
    self.close()
    self._next_batch = next_batch

  def close(self) -> None:
    """Stops prefetching threads and worker processes (they restart on the next batch)."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


def make_train_iterator(cfg: DataConfig, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The shuffled, augmented, infinite training stream of this process.

  Args:
    cfg: the data configuration.
    global_batch_size: examples per step over all processes; divisible by `process_count`.
    seed: shuffling and flip seed (any int).
    process_index: this process, default `jax.process_index()`.
    process_count: number of processes, default `jax.process_count()`.

  Returns:
    A `TrainIterator` yielding `{"image": float32 [B_local, H, W, C] in [-1, 1],
    "label": int32 [B_local]}` (`{"latent": float32 [B_local, h, w, c], "label"}` for
    source="latents") with `B_local = global_batch_size // process_count`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
  if process_count < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if not isinstance(seed, int):
    raise ValueError(f"seed must be an int, got {seed!r}")
  source = open_source(cfg)
  if len(source) == 0:
    raise ValueError(f"the {cfg.source!r} dataset of this DataConfig has no examples")
  return TrainIterator(cfg, source, global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)


def iterate_dataset(cfg: DataConfig, *, batch_size: int, split: str | None = None,
                    max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a split in dataset order, without augmentation (e.g. for FID statistics).

  Args:
    cfg: the data configuration; `cfg.random_flip` is ignored.
    batch_size: examples per batch; the last batch may be smaller.
    split: TFDS split to read instead of `cfg.split` (other sources have one split).
    max_examples: read only the first `max_examples` examples.

  Returns:
    An iterator of `{"image": uint8 [B, S, S, C] at the configured size, "label": int32 [B]}`.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if max_examples is not None and max_examples < 0:
    raise ValueError(f"max_examples must be >= 0, got {max_examples}")
  if cfg.source == "latents":
    raise ValueError("iterate_dataset reads images; DataConfig.source='latents' holds latents "
                     "(use the image dataset they were encoded from)")
  source = open_source(cfg, split)
  count = len(source) if max_examples is None else min(len(source), max_examples)
  dataset = grain.MapDataset.source(source)[:count].batch(batch_size, batch_fn=stack_examples)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)))
