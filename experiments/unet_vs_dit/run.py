"""Launches the U-Net vs DiT comparison: two backbones of matched size, everything else equal.

Trains both through the real CLI (`python -m jaxdiff.train`) with `configs/unet_vs_dit.py`, whose
variants pick the backbone, the dataset and the matched size; only the backbone differs between
the two runs. Fashion-MNIST is used when its prepared TFDS copy is present, else the offline MNIST
digits. Then run analyze.py.

  python experiments/unet_vs_dit/run.py --steps=400 --batch_size=32 --scale=cpu   # CPU, minutes
  python experiments/unet_vs_dit/run.py --steps=100000 --batch_size=128 --scale=large
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "auto", ["auto", "fashion_mnist", "mnist_offline"],
                  "auto: Fashion-MNIST if its TFDS copy is prepared, else the offline MNIST.")
flags.DEFINE_integer("steps", 400, "Optimizer steps for each backbone.")
flags.DEFINE_integer("batch_size", 32, "Global batch.")
flags.DEFINE_enum("scale", "small", ["cpu", "small", "large"],
                  "Matched model sizes (configs/unet_vs_dit.py SCALES).")
flags.DEFINE_string("workdir", os.path.join(_REPO, "runs", "unet_vs_dit"),
                    "Parent of the two run directories (checkpoints, metrics, samples).")


def fashion_mnist_available() -> bool:
  """Whether the prepared TFDS fashion_mnist can be read (no download is attempted)."""
  from configs import unet_vs_dit  # pylint: disable=import-outside-toplevel
  from jaxdiff.config import parse_config  # pylint: disable=import-outside-toplevel
  from jaxdiff.data import DatasetNotFoundError, dataset_info  # pylint: disable=import-outside-toplevel
  try:
    dataset_info(parse_config(unet_vs_dit.get_config("data=fashion_mnist")).data)
  except (DatasetNotFoundError, OSError, ImportError) as error:
    print(f"Fashion-MNIST is not available ({type(error).__name__}: {error}); "
          "using the offline MNIST sample")
    return False
  return True


def config_argument(backbone: str, dataset: str) -> str:
  """The --config value of one of the two runs."""
  variants = (f"backbone={backbone},data={dataset},scale={FLAGS.scale},steps={FLAGS.steps},"
              f"batch={FLAGS.batch_size}")
  return f"configs/unet_vs_dit.py:{variants}"


def main(argv):
  del argv
  dataset = FLAGS.dataset
  if dataset == "auto":
    dataset = "fashion_mnist" if fashion_mnist_available() else "mnist_offline"
  launches = {"dataset": dataset, "steps": FLAGS.steps, "batch_size": FLAGS.batch_size,
              "runs": {}}
  for backbone in ("unet", "dit"):
    workdir = os.path.join(FLAGS.workdir, f"{dataset}_{backbone}")
    command = [sys.executable, "-m", "jaxdiff.train",
               f"--config={config_argument(backbone, dataset)}", f"--workdir={workdir}"]
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=_REPO, check=True)
    wall = time.perf_counter() - start
    print(f"{backbone}: {wall:.0f} s wall-clock (process start to exit)", flush=True)
    launches["runs"][backbone] = {"workdir": workdir, "command": command[1:],
                                  "wall_clock_s": wall, "loadavg_end": os.getloadavg()}
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, f"launches_{dataset}.json"), "w") as f:
    json.dump(launches, f, indent=1)
  print(f"next: python experiments/unet_vs_dit/analyze.py --workdir={FLAGS.workdir} "
        f"--dataset={dataset}")


if __name__ == "__main__":
  app.run(main)
