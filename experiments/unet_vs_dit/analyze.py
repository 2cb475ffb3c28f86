"""Summarises the U-Net vs DiT runs of run.py: table, loss curves, sample grids side by side.

  python experiments/unet_vs_dit/analyze.py --workdir=runs/unet_vs_dit --dataset=mnist_offline

Reads each run's metrics.jsonl, last checkpoint (parameter count, FLOPs per image) and last
preview grid (EMA weights, DDIM 50 steps, guidance 2). Writes results_<dataset>.json,
loss_<dataset>.png and samples_<dataset>.png into --out_dir. FID/KID come from the sample and
evaluate CLIs (see README.md) and are added with --fid_json when they were computed.
The plots need matplotlib, from the `experiments` extra: pip install -e '.[experiments]'.
"""

import glob
import json
import os
import sys

from absl import app, flags
import numpy as np
from PIL import Image

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from experiments import common, train_setup  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.data import DatasetInfo  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.train.checkpoint import restore_for_inference  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/unet_vs_dit", "The --workdir given to run.py.")
flags.DEFINE_string("dataset", "mnist_offline", "The dataset run.py used.")
flags.DEFINE_string("out_dir", os.path.join(_HERE, "results"), "Where results go.")
flags.DEFINE_string("fid_json", "", "Optional {backbone: {fid, kid, ...}} from the evaluate CLI.")

BACKBONES = ("unet", "dit")
COLUMNS = [("backbone", "backbone", ""), ("model", "model", ""),
           ("params_m", "params (M)", ".3f"), ("gflops_per_image", "fwd GFLOP/img", ".3f"),
           ("steps", "steps", "d"), ("final_loss", "final loss", ".4f"),
           ("train_s", "train time (s)", ".0f"), ("compile_s", "compile (s)", ".0f"),
           ("wall_clock_s", "wall-clock (s)", ".0f"), ("images_per_s", "img/s", ".1f"),
           ("fid", "FID", ".2f"), ("kid", "KID", ".4f")]


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def loss_curve(lines: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean loss of each logged interval, training seconds at each log)."""
  logged = [l for l in lines if l.get("train/loss") is not None]
  steps = np.array([l["step"] for l in logged])
  losses = np.array([l["train/loss"] for l in logged])
  intervals = np.diff(np.concatenate([[0], steps]))
  seconds = np.cumsum(intervals / np.array([l["train/steps_per_sec"] for l in logged]))
  return steps, losses, seconds


def summarise(backbone: str, run: dict) -> tuple[dict, tuple]:
  """One table row and the loss curve of one run."""
  workdir = run["workdir"]
  lines = read_metrics(workdir)
  steps, losses, seconds = loss_curve(lines)
  config, model, params, _ = restore_for_inference(workdir)
  info = DatasetInfo(image_size=config.data.image_size, channels=config.data.channels,
                     num_classes=10, num_examples=0)
  flops = train_setup.forward_flops_per_image(model, params, info,
                                              config.model.class_conditional)
  compile_s = next((l["train/compile_seconds"] for l in lines
                    if "train/compile_seconds" in l), None)
  tail = losses[-max(len(losses) // 10, 1):]
  row = {"backbone": backbone, "model": config.model.name,
         "overrides": dict(config.model.overrides),
         "params_m": common.param_count(params) / 1e6, "gflops_per_image": flops / 1e9,
         "steps": int(steps[-1]), "final_loss": float(tail.mean()),
         "train_s": float(seconds[-1]), "compile_s": compile_s,
         "wall_clock_s": run["wall_clock_s"],
         "images_per_s": int(steps[-1]) * config.train.batch_size / float(seconds[-1])}
  return row, (steps, losses, seconds)


def _pyplot():
  """matplotlib.pyplot with the file-only Agg backend, imported on first use.

  matplotlib is not a dependency of jaxdiff itself, only of its `experiments` extra.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise SystemExit("analyze.py plots with matplotlib, which is not installed: "
                     "pip install -e '.[experiments]'") from error
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_losses(curves: dict, path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
  for backbone, (steps, losses, seconds) in curves.items():
    axes[0].plot(steps, losses, label=backbone)
    axes[1].plot(seconds, losses, label=backbone)
  for ax, xlabel in zip(axes, ("step", "training time (s)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("train loss (eps MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_samples(rows: list[dict], runs: dict, path: str) -> None:
  """The last preview grid of each run, side by side (left to right in `rows` order), as PNG."""
  grids = []
  for row in rows:
    found = sorted(glob.glob(os.path.join(runs[row["backbone"]]["workdir"], "samples", "*.png")))
    if found:
      grids.append(np.asarray(Image.open(found[-1]).convert("L")))
  if not grids:
    return
  height = max(g.shape[0] for g in grids)
  gap = np.full((height, 8), 255, np.uint8)
  padded = [np.pad(g, ((0, height - g.shape[0]), (0, 0)), constant_values=255) for g in grids]
  side_by_side = np.concatenate([x for g in padded for x in (g, gap)][:-1], axis=1)
  Image.fromarray(side_by_side).save(path, optimize=True)


def main(argv):
  del argv
  with open(os.path.join(FLAGS.workdir, f"launches_{FLAGS.dataset}.json")) as f:
    launches = json.load(f)
  fid = {}
  if FLAGS.fid_json:
    with open(FLAGS.fid_json) as f:
      fid = json.load(f)
  rows, curves = [], {}
  for backbone in BACKBONES:
    row, curves[backbone] = summarise(backbone, launches["runs"][backbone])
    row.update(fid.get(backbone, {}))
    rows.append(row)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  plot_losses(curves, os.path.join(FLAGS.out_dir, f"loss_{FLAGS.dataset}.png"))
  plot_samples(rows, launches["runs"], os.path.join(FLAGS.out_dir, f"samples_{FLAGS.dataset}.png"))
  print(f"{FLAGS.dataset}, batch {launches['batch_size']}, {launches['steps']} steps each")
  print(common.format_table(rows, COLUMNS))
  common.write_json(os.path.join(FLAGS.out_dir, f"results_{FLAGS.dataset}.json"), {
      "experiment": "unet_vs_dit", "machine": common.machine_info(), "launches": launches,
      "rows": rows,
      "curves": {b: {"step": c[0], "loss": c[1], "seconds": c[2]} for b, c in curves.items()}})


if __name__ == "__main__":
  app.run(main)
