"""Cached autoencoder latents: the on-disk format and the `latents` data source.

`python -m jaxdiff.data.encode` (see `encode.py`) writes a folder with

  latents.json                        what the records hold (see `read_latents_info`)
  latents-00000-of-0000K.array_record ArrayRecord shards, read as one sequence by grain

  contexts.npy                        text embeddings, only for a caption folder encoded with
                                      a text encoder (see below)

Record i is example i of the encoded dataset, in dataset order: float32 [V, 2, h, w, c] (V
variants: the image, then its horizontal flip when flips were encoded; [:, 0] the posterior
mean, [:, 1] its standard deviation), then the int32 label, as raw little-endian bytes.

Text-to-image (an image–caption folder encoded with `--pipeline`): the label is the caption's
index in the caption table `captions` of latents.json, and `contexts.npy` holds float32
[U + 1, L, D], the text encoder's output for each of the U distinct captions and, last, for the
empty prompt (what caption dropout substitutes). Each distinct caption is encoded once; a
training example reads the row of its label (`context` [L, D]).

Why the posterior (mean, std) and not a sample: a sample fixed at encoding time would give the
diffusion model the same latent every epoch, while LDM and DiT draw z ~ q(z | x) afresh at
every step (DiT's train.py calls `latent_dist.sample()` per batch). Storing mean and std keeps
that at twice the space of one sample and lets a run choose the mean instead.

The training stream (`pipeline.TrainIterator`) reads position g as it reads images: example
`permutation(seed, epoch)[g % N]`, flipped when `flip_bit(seed, g)`; the latent is then
z = mean + std * eps with eps drawn from NumPy's generator seeded by (seed, g), scaled to the
diffusion model's scale (z - shift_factor) * scaling_factor. Every value is a function of
(seed, g) only, so batches do not depend on the process or worker count or on resumption.
"""
import json
import os

import grain
import numpy as np

INFO_FILE = "latents.json"
CONTEXTS_FILE = "contexts.npy"
FORMAT = "jaxdiff-latents-v1"
_MASK64 = (1 << 64) - 1
_POSTERIOR_STREAM = 0x706F7374  # Separates the posterior noise from the shuffle and flips.
SAMPLINGS = ("sample", "mean")


def shard_name(index: int, count: int) -> str:
  """File name of shard `index` of `count`."""
  return f"latents-{index:05d}-of-{count:05d}.array_record"


def pack_record(moments: np.ndarray, label: int) -> bytes:
  """float32 [V, 2, h, w, c] (mean, std per variant) and a label -> one record's bytes."""
  moments = np.ascontiguousarray(moments, dtype="<f4")
  return moments.tobytes() + np.asarray(label, "<i4").tobytes()


def unpack_record(record: bytes, variants: int, latent_shape) -> tuple[np.ndarray, np.int32]:
  """Inverse of `pack_record`: (float32 [V, 2, h, w, c], int32 label)."""
  moments = np.frombuffer(record, "<f4", count=variants * 2 * int(np.prod(latent_shape)))
  label = np.frombuffer(record, "<i4", count=1, offset=moments.nbytes)[0]
  return moments.reshape(variants, 2, *latent_shape).astype(np.float32), np.int32(label)


def read_latents_info(directory: str) -> dict:
  """The `latents.json` of a latents folder.

  Keys: format, num_examples, latent_shape [h, w, c], variants (2 when flips are stored),
  num_classes, scaling_factor, shift_factor, channel_mean and channel_std (of z ~ q(z | x)
  over all stored variants, before scaling), suggested_scaling_factor (1 / overall std, LDM's
  rule), files, image_size, image_channels, autoencoder, data; for text embeddings also
  captions (the U distinct captions), context_shape [L, D] and text_encoder (the pipeline).

  Raises:
    ValueError: naming DataConfig.latents_dir, when the folder or its files are missing.
  """
  path = os.path.join(directory, INFO_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"DataConfig.latents_dir={directory!r} has no {INFO_FILE}: encode a "
                     "dataset first with python -m jaxdiff.data.encode --output_dir=DIR")
  with open(path) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{path}: format {info.get('format')!r} is not {FORMAT!r}")
  needed = info["files"] + ([CONTEXTS_FILE] if "captions" in info else [])
  missing = [f for f in needed if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise ValueError(f"DataConfig.latents_dir={directory!r} lacks the shards or "
                     f"{CONTEXTS_FILE} named in {INFO_FILE}: {missing[:3]}")
  return info


def read_contexts(directory: str, info: dict) -> np.ndarray:
  """The text embeddings of a latents folder: float32 [U + 1, L, D] (memory-mapped), the last
  row the empty prompt's; checked against latents.json."""
  contexts = np.load(os.path.join(directory, CONTEXTS_FILE), mmap_mode="r")
  expected = (len(info["captions"]) + 1, *info["context_shape"])
  if contexts.shape != expected or contexts.dtype != np.float32:
    raise ValueError(f"{os.path.join(directory, CONTEXTS_FILE)} holds {contexts.dtype} "
                     f"{contexts.shape}, but {INFO_FILE} describes float32 {expected}")
  return contexts


class LatentSource:
  """Random access to cached latents: item i is {"moments": [V, 2, h, w, c], "label"}.

  Attributes (as the image sources'): num_classes; channels (latent channels); image_size
  (latent side); latent_shape (h, w, c); variants; scaling_factor; shift_factor; contexts
  (float32 [U + 1, L, D] text embeddings, the last the empty prompt's) or None without text.
  """

  def __init__(self, directory: str, *, random_flip: bool, sampling: str = "sample"):
    info = read_latents_info(directory)
    if sampling not in SAMPLINGS:
      raise ValueError(f"DataConfig.latent_sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if random_flip and info["variants"] < 2:
      raise ValueError(f"DataConfig.random_flip=True, but the latents in {directory!r} were "
                       "encoded without flips; re-encode with --random_flip or set "
                       "random_flip=False")
    height, width, channels = info["latent_shape"]
    if height != width:
      raise ValueError(f"latents in {directory!r} are {height}x{width}; jaxdiff's models "
                       "take square inputs")
    self.latent_shape = (height, width, channels)
    self.image_size, self.channels = height, channels
    self.num_classes, self.variants = int(info["num_classes"]), int(info["variants"])
    self.scaling_factor = float(info["scaling_factor"])
    self.shift_factor = float(info["shift_factor"])
    self.sampling = sampling
    self._num_examples = int(info["num_examples"])
    self._data = grain.sources.ArrayRecordDataSource(
        [os.path.join(directory, f) for f in info["files"]])
    if len(self._data) != self._num_examples:
      raise ValueError(f"{directory!r}: {INFO_FILE} says {self._num_examples} examples, the "
                       f"shards hold {len(self._data)}")
    self.contexts = read_contexts(directory, info) if "captions" in info else None

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    moments, label = unpack_record(self._data[int(index)], self.variants, self.latent_shape)
    return {"moments": moments, "label": label}

  def training_example(self, index: int, flip: bool, seed: int,
                       position: int) -> dict[str, np.ndarray]:
    """The latent read at global `position`: {"latent": float32 [h, w, c], "label"}, and with
    text embeddings {"context": float32 [L, D]} of the example's caption."""
    example = self[index]
    mean, std = example["moments"][int(flip)]
    if self.sampling == "sample":
      rng = np.random.default_rng([seed & _MASK64, _POSTERIOR_STREAM, position])
      mean = mean + std * rng.standard_normal(mean.shape, np.float32)
    latent = (mean - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)
    out = {"latent": latent.astype(np.float32), "label": example["label"]}
    if self.contexts is not None:
      out["context"] = np.array(self.contexts[example["label"]])
    return out

  @staticmethod
  def training_batch(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{"latent": float32 [B, h, w, c], "label": int32 [B]} (and "context" [B, L, D])."""
    batch = {"latent": np.stack([e["latent"] for e in examples]),
             "label": np.asarray([e["label"] for e in examples], dtype=np.int32)}
    if "context" in examples[0]:
      batch["context"] = np.stack([e["context"] for e in examples])
    return batch
