"""Launches the U-Net vs DiT comparison: two backbones of matched size, everything else equal.

Trains both through the real CLI (`python -m jaxdiff.train`) with the same data, schedule,
optimizer, batch, steps, EMA and preview sampler; only the backbone differs. Fashion-MNIST is used
when its prepared TFDS copy is present, else the offline MNIST digits (configs/base.py defaults),
both class-conditional at 32x32x1 with label dropout 0.1. Then run analyze.py.

  python experiments/unet_vs_dit/run.py --steps=400 --batch_size=32      # CPU, a few minutes
  python experiments/unet_vs_dit/run.py --steps=100000 --batch_size=128 \
      --unet_channels=64 --dit_hidden_size=256 --dit_depth=8             # accelerator

Default sizes are matched at about 1.6M parameters (analyze.py reports both counts):
`unet-small` at 32 channels and a DiT-S/2 shape with 4 blocks of width 144. The CPU run recorded
in README.md used `--unet_model=unet-tiny --dit_depth=2 --dit_hidden_size=128` (about 0.7M each).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
sys.path.insert(0, _REPO)

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "auto", ["auto", "fashion_mnist", "mnist_offline"],
                  "auto: Fashion-MNIST if its TFDS copy is prepared, else the offline MNIST.")
flags.DEFINE_integer("steps", 400, "Optimizer steps for each backbone.")
flags.DEFINE_integer("num_images", 16, "Images in the final sample grid (DDIM 50, guidance 2).")
flags.DEFINE_integer("batch_size", 32, "Global batch.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate (both backbones).")
flags.DEFINE_string("unet_model", "unet-small", "U-Net size-table entry.")
flags.DEFINE_integer("unet_channels", 32, "The U-Net's width of level 0.")
flags.DEFINE_integer("dit_hidden_size", 144, "DiT width.")
flags.DEFINE_integer("dit_depth", 4, "DiT blocks.")
flags.DEFINE_integer("dit_heads", 4, "DiT attention heads.")
flags.DEFINE_integer("dit_patch_size", 2, "DiT patch size.")
flags.DEFINE_string("workdir", os.path.join(_REPO, "runs", "unet_vs_dit"),
                    "Parent of the two run directories (checkpoints, metrics, samples).")

CONFIGS = {"fashion_mnist": {"unet": "configs/fashion_mnist_unet.py",
                             "dit": "configs/fashion_mnist_dit.py"},
           "mnist_offline": {"unet": "configs/base.py",
                             "dit": "configs/base.py"}}


def fashion_mnist_available() -> bool:
  """Whether the prepared TFDS fashion_mnist can be read (no download is attempted)."""
  from jaxdiff.config import parse_config  # pylint: disable=import-outside-toplevel
  from jaxdiff.data import DatasetNotFoundError, dataset_info  # pylint: disable=import-outside-toplevel
  from configs import fashion_mnist_unet  # pylint: disable=import-outside-toplevel
  try:
    dataset_info(parse_config(fashion_mnist_unet.get_config()).data)
  except (DatasetNotFoundError, OSError, ImportError) as error:
    print(f"Fashion-MNIST is not available ({type(error).__name__}: {error}); "
          "using the offline MNIST sample")
    return False
  return True


def backbone_overrides(backbone: str) -> list[str]:
  """Config overrides that select one of the two matched backbones."""
  if backbone == "unet":
    return [f"--config.model.name={FLAGS.unet_model}",
            f"--config.model.overrides.channels={FLAGS.unet_channels}"]
  return ["--config.model.name=dit-s/2",
          f"--config.model.overrides.hidden_size={FLAGS.dit_hidden_size}",
          f"--config.model.overrides.depth={FLAGS.dit_depth}",
          f"--config.model.overrides.num_heads={FLAGS.dit_heads}",
          f"--config.model.overrides.patch_size={FLAGS.dit_patch_size}"]


def shared_overrides() -> list[str]:
  """Everything the two runs share, stated explicitly so both configs agree."""
  return [
      "--config.model.class_conditional=True", "--config.model.class_dropout_prob=0.1",
      "--config.data.image_size=32", f"--config.train.num_steps={FLAGS.steps}",
      f"--config.train.batch_size={FLAGS.batch_size}",
      f"--config.optimizer.learning_rate={FLAGS.learning_rate}",
      f"--config.optimizer.warmup_steps={max(FLAGS.steps // 20, 1)}",
      "--config.optimizer.decay=cosine", "--config.optimizer.end_lr_fraction=0.05",
      "--config.train.ema_decays=(0.995,)", "--config.sample.ema_decay=0.995",
      f"--config.train.log_every={max(FLAGS.steps // 40, 1)}",
      f"--config.train.sample_every={FLAGS.steps}",
      f"--config.checkpoint.every_steps={FLAGS.steps}",
      "--config.sample.method=ddim", "--config.sample.num_steps=50",
      f"--config.sample.num_images={FLAGS.num_images}", "--config.sample.guidance_scale=2.0",
      "--config.train.progress_bar=False"]


def main(argv):
  del argv
  dataset = FLAGS.dataset
  if dataset == "auto":
    dataset = "fashion_mnist" if fashion_mnist_available() else "mnist_offline"
  launches = {"dataset": dataset, "steps": FLAGS.steps, "batch_size": FLAGS.batch_size,
              "runs": {}}
  for backbone in ("unet", "dit"):
    workdir = os.path.join(FLAGS.workdir, f"{dataset}_{backbone}")
    command = [sys.executable, "-m", "jaxdiff.train", f"--config={CONFIGS[dataset][backbone]}",
               f"--workdir={workdir}", *backbone_overrides(backbone), *shared_overrides()]
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
