r"""Prepares a TFDS dataset in ArrayRecord format, the format jaxdiff reads without TensorFlow.

TFDS builders of image datasets (cifar10, mnist, ...) read their downloaded archives with
TensorFlow, so this needs the optional extra and internet:

  pip install 'jaxdiff[prepare]'
  python -m jaxdiff.data.prepare --dataset=cifar10 --data_dir=~/tensorflow_datasets

The prepared folder (`DATA_DIR/cifar10/`) can then be copied to machines without internet.
"""
import os

from absl import app
from absl import flags

from jaxdiff.data.sources import prepare_tfds
from jaxdiff.data.sources import tensorflow_installed

_DATASET = flags.DEFINE_string("dataset", None, "TFDS dataset name, e.g. cifar10.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "TFDS data directory (default $TFDS_DATA_DIR or "
                                "~/tensorflow_datasets).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not tensorflow_installed():
    raise app.UsageError("preparing TFDS datasets needs TensorFlow: pip install "
                         "'jaxdiff[prepare]' (reading them later does not)")
  data_dir = os.path.expanduser(_DATA_DIR.value) if _DATA_DIR.value else None
  path = prepare_tfds(_DATASET.value, data_dir)
  print(f"Prepared {_DATASET.value} in {path}")


if __name__ == "__main__":
  app.run(main)
