"""A 20-example MNIST-shaped TFDS dataset, and helpers to recognise its examples in batches.

Shared by test_sources.py and test_pipeline.py (the prepared copy is the `digits_dir` fixture
of tests/conftest.py). Importing this module registers the builder with TFDS.
"""
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxdiff import data
from jaxdiff.data import sources

NAME = "jaxdiff_test_digits"
TRAIN_SIZE, TEST_SIZE = 20, 6


def digit_value(index: int, split: str) -> int:
  """The pixel value of example `index` of `split`; distinct over both splits."""
  return 12 + 11 * index if split == "train" else 240 + index


def digit_image(value: int) -> np.ndarray:
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
    return {"train": self._generate_examples("train", TRAIN_SIZE),
            "test": self._generate_examples("test", TEST_SIZE)}

  def _generate_examples(self, split, count):
    for i in range(count):
      # PIL images are encoded with PIL; numpy arrays would need TensorFlow.
      yield i, {"image": Image.fromarray(digit_image(digit_value(i, split))[..., 0]),
                "label": i % 4}


def prepare(data_dir: str) -> str:
  """Prepares the dataset under `data_dir` and returns `data_dir`."""
  sources.prepare_tfds(NAME, data_dir)
  return data_dir


def digits_config(data_dir, **overrides) -> data.DataConfig:
  return data.DataConfig(source="tfds", name=NAME, data_dir=data_dir, num_threads=2,
                         **overrides)


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)


def identify(batch) -> list[tuple[int, bool, int]]:
  """(train index, flipped, label) of each image of a batch of padded test digits."""
  images = to_uint8(batch["image"])
  out = []
  for image, label in zip(images, batch["label"]):
    value = int(image.max())
    flipped = bool(image[16, 20, 0])
    expected = np.pad(digit_image(value), ((2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(image, expected[:, ::-1] if flipped else expected)
    index = (value - 12) // 11
    assert digit_value(index, "train") == value and label == index % 4
    out.append((index, flipped, int(label)))
  return out


def take(iterator, count):
  return [next(iterator) for _ in range(count)]
