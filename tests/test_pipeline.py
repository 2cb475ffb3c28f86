"""Tests of jaxdiff.data.pipeline: scaling, seeded order and flips, process sharding and resume,
on the hand-made TFDS digits of tests/tfds_digits.py."""
import json

import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.data import pipeline
from jaxdiff.data import sources
from tfds_digits import TRAIN_SIZE, digit_image, digit_value, digits_config, identify, take


def _assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_train_batches(digits_dir):
  iterator = data.make_train_iterator(digits_config(digits_dir), global_batch_size=8, seed=0,
                                      process_index=0, process_count=1)
  for batch in take(iterator, 3):
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 32, 32, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    assert batch["image"].min() == -1.0 and batch["image"].max() <= 1.0
    ids = identify(batch)
    assert not any(flipped for _, flipped, _ in ids)
    # Exact scaling: x / 127.5 - 1 of the hand-made padded digit.
    expected = np.stack([np.pad(digit_image(digit_value(i, "train")), ((2, 2), (2, 2), (0, 0)))
                         for i, _, _ in ids]).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-6)


def test_same_seed_same_batches_and_epochs_are_permutations(digits_dir):
  cfg = digits_config(digits_dir, random_flip=True)
  make = lambda seed: data.make_train_iterator(cfg, global_batch_size=8, seed=seed,
                                               process_index=0, process_count=1)
  run = take(make(0), 10)
  _assert_batches_equal(run, take(make(0), 10))
  ids = [entry for batch in run for entry in identify(batch)]
  orders = [[i for i, _, _ in ids[e * TRAIN_SIZE:(e + 1) * TRAIN_SIZE]] for e in range(4)]
  for order in orders:
    assert sorted(order) == list(range(TRAIN_SIZE))
  assert orders[0] != orders[1]
  flips = [flipped for _, flipped, _ in ids]
  assert 0.25 < np.mean(flips) < 0.75
  other = [i for batch in take(make(1), 3) for i, _, _ in identify(batch)]
  assert other[:TRAIN_SIZE] != orders[0]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_is_bitwise_identical(digits_dir, process_count):
  cfg = digits_config(digits_dir, random_flip=True)
  single = take(data.make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=0,
                                         process_count=1), 6)
  shards = [take(data.make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=p,
                                          process_count=process_count), 6)
            for p in range(process_count)]
  for step, batch in enumerate(single):
    parts = [shard[step] for shard in shards]
    assert parts[0]["image"].shape == (8 // process_count, 32, 32, 1)
    _assert_batches_equal([batch], [{k: np.concatenate([p[k] for p in parts])
                                     for k in ("image", "label")}])


class _CountingSource(sources.ImageSource):
  """Ten distinct constant images labelled by their index; records what is read."""

  def __init__(self):
    self.num_classes, self.channels, self.image_size, self.fit = 10, 1, 4, "pad"
    self.read = []

  def __len__(self):
    return 10

  def _read(self, index):
    self.read.append(index)
    return np.full((4, 4, 1), index, np.uint8), index


def test_each_process_reads_only_its_rows():
  cfg = data.DataConfig(num_threads=0, prefetch=1)
  single = pipeline.TrainIterator(cfg, _CountingSource(), global_batch_size=4, seed=2,
                                  process_index=0, process_count=1)
  rows = [next(single)["label"] for _ in range(3)]
  source = _CountingSource()
  second = pipeline.TrainIterator(cfg, source, global_batch_size=4, seed=2, process_index=1,
                                  process_count=2)
  for step in range(3):
    np.testing.assert_array_equal(next(second)["label"], rows[step][2:])
  assert source.read == [int(i) for step_rows in rows for i in step_rows[2:]]


def test_resume_continues_the_same_batches(digits_dir):
  cfg = digits_config(digits_dir, random_flip=True)
  make = lambda **kw: data.make_train_iterator(cfg, global_batch_size=8, seed=7, **kw)
  original = make(process_index=0, process_count=1)
  take(original, 3)
  state = json.loads(json.dumps(original.get_state()))
  expected = take(original, 4)
  resumed = make(process_index=0, process_count=1)
  next(resumed)  # A position that set_state must discard.
  resumed.set_state(state)
  _assert_batches_equal(take(resumed, 4), expected)
  assert resumed.get_state() == original.get_state()
  # The position is global: a 2-process run may resume a 1-process checkpoint.
  half = make(process_index=1, process_count=2)
  half.set_state(state)
  _assert_batches_equal(take(half, 4), [{k: b[k][4:] for k in b} for b in expected])
  with pytest.raises(ValueError, match="seed"):
    make(process_index=0, process_count=1).set_state({**state, "seed": 8})


@pytest.mark.slow
def test_worker_processes_do_not_change_batches():
  make = lambda workers: data.make_train_iterator(
      data.DataConfig(random_flip=True, num_workers=workers), global_batch_size=8, seed=0,
      process_index=0, process_count=1)
  with_workers = make(2)
  try:
    batches = take(with_workers, 5)
  finally:
    with_workers.close()
  _assert_batches_equal(batches, take(make(0), 5))
