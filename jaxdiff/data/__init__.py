"""Data: TFDS / image folder / offline MNIST -> batches of images in [-1, 1], split per process;
cached autoencoder latents (source "latents", written by `python -m jaxdiff.data.encode`) ->
batches of latents through the same stream.

Public API (see docs/architecture.md):
  `DataConfig`, `DatasetInfo`, `DatasetNotFoundError`, `BadRecordError`, `dataset_info(cfg)`,
  `make_train_iterator(cfg, *, global_batch_size, seed, process_index, process_count)`,
  `iterate_dataset(cfg, *, batch_size, split, max_examples)`.
"""
from jaxdiff.data.config import BadRecordError
from jaxdiff.data.config import DataConfig
from jaxdiff.data.config import DatasetInfo
from jaxdiff.data.config import DatasetNotFoundError
from jaxdiff.data.pipeline import TrainIterator
from jaxdiff.data.pipeline import dataset_info
from jaxdiff.data.pipeline import iterate_dataset
from jaxdiff.data.pipeline import make_train_iterator

__all__ = [
    "BadRecordError",
    "DataConfig",
    "DatasetInfo",
    "DatasetNotFoundError",
    "TrainIterator",
    "dataset_info",
    "iterate_dataset",
    "make_train_iterator",
]
