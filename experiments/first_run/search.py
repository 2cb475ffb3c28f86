"""The first-run recipe search: trains variants of `configs/mnist_offline.py`, samples each and
scores the samples with the offline digit scorer (`jaxdiff.eval.digits`).

Every variant runs the real commands a user runs, each timed from process start to exit
(imports, compilation, previews and checkpoints included):

  python -m jaxdiff.train --config=configs/mnist_offline.py --workdir=RUNS/NAME --config.X=...
  python -m jaxdiff.sample --workdir=RUNS/NAME --num_samples=1000 --out=RUNS/NAME/scored_NAME

then the 1,000 samples are scored: Fréchet distance of the digit classifier's features to the
5,000 real digits (1,000 held-out real digits score about 1), class coverage, the share of
confidently classified samples and the rarest class's share. One row per variant is appended to
--rows (JSON lines); a variant already there is not run again, so the search resumes.

  python experiments/first_run/search.py --runs=/tmp/first_run --rows=experiments/first_run/search.jsonl
  python experiments/first_run/search.py --variants=default,default_steps=300 --runs=...

Wall clocks are only comparable on a quiet machine: each row records the 1-minute load average
at its start and the cores other processes kept busy while it ran (`common.LoadMeter`).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from experiments import common  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff import cli  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.eval import digits  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "/tmp/first_run", "Folder of the variants' run directories.")
flags.DEFINE_string("rows", "experiments/first_run/search.jsonl", "JSON-lines file of the rows.")
flags.DEFINE_list("variants", [], "Variants to run (default: all, in table order).")
flags.DEFINE_integer("num_samples", 1000, "Samples scored per variant.")
flags.DEFINE_string("base_config", "configs/mnist_offline.py", "The config the variants override.")
flags.DEFINE_string("scorer_cache", None, "Where the digit scorer is cached (default ~/.cache/jaxdiff).")

# The 0.18M-parameter two-level U-Net of the first round's default, as that default set it.
_UNET_TINY = {"model.name": "unet-tiny", "model.overrides.channels": 16}
# A DiT on 4x4 patches (64 tokens of a 32x32 digit), 1.9M parameters.
_DIT_P4 = {"model.name": "dit-s/2", "model.overrides.patch_size": 4,
           "model.overrides.hidden_size": 128, "model.overrides.depth": 6,
           "model.overrides.num_heads": 4}
# Three levels (32, 16, 8) with attention only at 8x8: cheaper than unet-tiny's two levels with
# attention at 16x16, and every pixel sees the whole digit. 0.28M parameters at width 16.
_UNET_3 = {"model.name": "unet-tiny", "model.overrides.channels": 16,
           "model.overrides.channel_mult": (1, 2, 2), "model.overrides.attention_levels": (2,)}
_V_COSINE = {"diffusion.prediction": "v", "diffusion.schedule": "cosine"}
_EPS_LINEAR = {"diffusion.prediction": "eps", "diffusion.schedule": "linear"}
# Every screening variant samples with deterministic DDIM 20 (other samplers: SAMPLERS).
_DDIM_20 = {"sample.method": "ddim", "sample.num_steps": 20}
_DIT_P4_400 = {**_DIT_P4, "train.num_steps": 400, "train.batch_size": 64, **_DDIM_20}
_UNET_3_600 = {**_UNET_3, "train.num_steps": 600, "train.batch_size": 32, **_DDIM_20}

# The default of 2026-12-06 (unconditional, 1,600 steps), which every variant below was run
# against; `default` is the config as it is now (class-conditional, guided, 1,200 steps).
_UNCONDITIONAL_DEFAULT = {"model.class_conditional": False, "model.class_dropout_prob": 0.0,
                          "sample.guidance_scale": 1.0, "train.num_steps": 1600,
                          "train.sample_every": 400, "sample.num_images": 36}
_CONDITIONAL = {"model.class_conditional": True, "model.class_dropout_prob": 0.1}

# name -> (what changes, config overrides): each starts from --base_config with
# _UNCONDITIONAL_DEFAULT's overrides (see VARIANTS).
_VARIANTS = {
    "default_r1": ("first round's default: unet-tiny c16, eps, linear, batch 32, 1,500 steps, "
                   "DDIM 20",
                   {**_UNET_TINY, "train.num_steps": 1500, "train.batch_size": 32, **_EPS_LINEAR,
                    "train.ema_decays": (0.99,), **_DDIM_20, "model.class_conditional": False}),
    "unet_tiny": ("the same U-Net at a 5-minute budget: 500 steps",
                  {**_UNET_TINY, "train.num_steps": 500, "train.batch_size": 32, **_EPS_LINEAR,
                   **_DDIM_20}),
    "dit4_eps": ("DiT patch 4, batch 64, 400 steps, eps, linear", {**_DIT_P4_400, **_EPS_LINEAR}),
    "dit4_v": ("dit4_eps with v prediction and the cosine schedule",
               {**_DIT_P4_400, **_V_COSINE}),
    "dit4_v_cond": ("dit4_v, class-conditional (labels cycle 0-9 in samples)",
                    {**_DIT_P4_400, **_V_COSINE, "model.class_conditional": True}),
    "unet3": ("three-level U-Net, width 16, attention at 8x8; batch 32, 600 steps, eps, linear",
              {**_UNET_3_600, **_EPS_LINEAR}),
    "unet3_v": ("unet3 with v prediction and the cosine schedule", {**_UNET_3_600, **_V_COSINE}),
    "unet3_cond": ("unet3, class-conditional (labels cycle 0-9 in samples)",
                   {**_UNET_3_600, **_EPS_LINEAR, "model.class_conditional": True}),
    "unet3_minsnr": ("unet3 with Min-SNR-5 loss weighting (Hang et al. 2023)",
                     {**_UNET_3_600, **_EPS_LINEAR, "diffusion.weighting": "min_snr"}),
    "unet3_x0": ("unet3 predicting x0 (plain x0 MSE), linear schedule",
                 {**_UNET_3_600, "diffusion.prediction": "x0", "diffusion.schedule": "linear"}),
    "unet3_v_lr4e-3": ("unet3_v at twice the peak learning rate (4e-3)",
                       {**_UNET_3_600, **_V_COSINE, "optimizer.learning_rate": 4e-3}),
    "unet3_v_b16": ("unet3_v at batch 16 for 1,000 steps",
                    {**_UNET_3_600, **_V_COSINE, "train.num_steps": 1000,
                     "train.batch_size": 16}),
    "unet3_v_c24": ("unet3_v at width 24 (0.6M parameters), 400 steps",
                    {**_UNET_3_600, **_V_COSINE, "model.overrides.channels": 24,
                     "train.num_steps": 400}),
    "unet3_v_minsnr": ("unet3_v with Min-SNR-5 weighting",
                       {**_UNET_3_600, **_V_COSINE, "diffusion.weighting": "min_snr"}),
    # At the budget of the unconditional default (1,600 steps at batch 16 on two CPU devices).
    "default_minsnr": ("the default with Min-SNR-5 weighting",
                       {**_UNET_3, "diffusion.weighting": "min_snr"}),
    "default_c24": ("the default at width 24 (0.6M parameters), 1,100 steps",
                    {**_UNET_3, "model.overrides.channels": 24, "train.num_steps": 1100}),
    "default_cond": ("the default, class-conditional with 10% label dropout (for guidance)",
                     {**_UNET_3, **_CONDITIONAL}),
    "default_cond_1000": ("default_cond for 1,000 steps",
                          {**_UNET_3, **_CONDITIONAL, "train.num_steps": 1000}),
    "default_cond_1200": ("default_cond for 1,200 steps",
                          {**_UNET_3, **_CONDITIONAL, "train.num_steps": 1200}),
}
VARIANTS = {name: (what, {**_UNCONDITIONAL_DEFAULT, **overrides})
            for name, (what, overrides) in _VARIANTS.items()}


# Other samplers on a trained variant's run: the variant "RUN@SAMPLER" samples RUN's final
# checkpoint with SAMPLER's flags and is scored the same way (train_s is RUN's).
SAMPLERS = {
    "ddim20": ["--method=ddim", "--num_steps=20", "--eta=0"],
    "ddim20eta1": ["--method=ddim", "--num_steps=20", "--eta=1"],
    "ddim10eta1": ["--method=ddim", "--num_steps=10", "--eta=1"],
    "ddim15eta1": ["--method=ddim", "--num_steps=15", "--eta=1"],
    "ddim50eta1": ["--method=ddim", "--num_steps=50", "--eta=1"],
    "ddim50": ["--method=ddim", "--num_steps=50", "--eta=0"],
    "ddim10": ["--method=ddim", "--num_steps=10", "--eta=0"],
    "ddim12": ["--method=ddim", "--num_steps=12", "--eta=0"],
    "dpmpp20": ["--method=dpmpp_2m", "--num_steps=20"],
    "dpmpp12": ["--method=dpmpp_2m", "--num_steps=12"],
    "dpmpp10": ["--method=dpmpp_2m", "--num_steps=10"],
    "unipc10": ["--method=unipc", "--num_steps=10"],
    "ddpm100": ["--method=ddpm", "--num_steps=100"],
    "dpmpp10g1.25": ["--method=dpmpp_2m", "--num_steps=10", "--guidance_scale=1.25"],
    "dpmpp10g1.5": ["--method=dpmpp_2m", "--num_steps=10", "--guidance_scale=1.5"],
    "dpmpp10g2": ["--method=dpmpp_2m", "--num_steps=10", "--guidance_scale=2"],
    "dpmpp10g3": ["--method=dpmpp_2m", "--num_steps=10", "--guidance_scale=3"],
}


def _flag(name: str, value) -> str:
  if isinstance(value, tuple):
    return f"--config.{name}=({','.join(map(str, value))},)"
  return f"--config.{name}={value}"


def _run(args: list[str]) -> float:
  """Runs a jaxdiff command to completion; returns its wall-clock seconds."""
  env = dict(os.environ, PYTHONPATH=REPO)
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): "
                       f"{result.stderr[-2000:]}")
  return seconds


def train_spec(name: str) -> tuple[str, str, dict]:
  """(description, --config argument, config overrides) of a trained variant.

  "default" is --config as it is (README line 1); "default_steps=N" the same for N steps (the
  default at other wall-clock budgets); the rest are `VARIANTS`, whose `model=` config variant
  clears the config's model.overrides so that each variant sets its own.
  """
  if name == "default":
    return "the default config, unchanged", FLAGS.base_config, {}
  if name.startswith("default_steps="):
    steps = int(name.split("=")[1])
    separator = "," if ":" in FLAGS.base_config else ":"  # after the config's own variants
    return (f"the default config for {steps} steps",
            f"{FLAGS.base_config}{separator}steps={steps}", {})
  description, overrides = VARIANTS[name]
  return description, f"{FLAGS.base_config}:model={overrides['model.name']}", overrides


def run_variant(name: str, scorer, rows: dict[str, dict]) -> dict:
  """Trains (or, for a sampler variant, reuses), samples and scores one variant; its row."""
  meter = common.LoadMeter()
  if "@" in name:
    trained, sampler = name.split("@", 1)
    sample_flags = SAMPLERS[sampler]
    if trained not in rows:
      raise RuntimeError(f"sampler variant {name} needs variant {trained} first")
    description = f"{trained}, sampled with {' '.join(sample_flags)}"
    overrides, train_s = rows[trained]["overrides"], rows[trained]["train_s"]
    workdir = os.path.join(FLAGS.runs, trained)
  else:
    description, config_arg, overrides = train_spec(name)
    sample_flags = []
    workdir = os.path.join(FLAGS.runs, name)
    if os.path.exists(workdir):
      raise RuntimeError(f"{workdir} exists: remove it so the wall clock covers the whole run")
    train_s = _run(["jaxdiff.train", f"--config={config_arg}", f"--workdir={workdir}",
                    "--config.train.progress_bar=False",
                    *[_flag(k, v) for k, v in overrides.items()]])
  out = os.path.join(workdir, f"scored_{name}")
  sample_s = _run(["jaxdiff.sample", f"--workdir={workdir}",
                   f"--num_samples={FLAGS.num_samples}", f"--out={out}", *sample_flags])
  load = meter.record()
  (npz,) = [f for f in os.listdir(out) if f.endswith(".npz")]
  with np.load(os.path.join(out, npz)) as data:
    scores = digits.score_digits(scorer, data["arr_0"])
  return {"variant": name, "description": description, "overrides": overrides,
          "train_s": train_s, "sample_s": sample_s, "samples_file": npz, **scores,
          "smallest_share": min(scores["class_shares"]), **load,
          "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count()}


COLUMNS = [("variant", "variant", ""), ("train_s", "train s", ".0f"),
           ("sample_s", "sample 1k s", ".0f"), ("frechet_distance", "Fréchet", ".1f"),
           ("class_coverage", "classes", ".0%"), ("confident", "confident", ".0%"),
           ("smallest_share", "rarest", ".1%"), ("load_start", "load", ".2f"),
           ("other_cpu", "others' cores", ".2f")]


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv):
  del argv
  known = ["default", *VARIANTS]
  names = FLAGS.variants or known

  def is_known(name):
    if "@" in name:
      trained, sampler = name.split("@", 1)
      return is_known(trained) and sampler in SAMPLERS
    return name in known or name.startswith("default_steps=")

  unknown = [n for n in names if not is_known(n)]
  if unknown:
    cli.fail(f"--variants: unknown {unknown}; choose from {', '.join(known)}, default_steps=N, "
             f"each optionally followed by @ and one of {', '.join(SAMPLERS)}")
  scorer = digits.load_scorer(FLAGS.scorer_cache)
  rows = {row["variant"]: row for row in read_rows(FLAGS.rows)}
  for name in names:
    if name in rows:
      continue
    row = rows[name] = run_variant(name, scorer, rows)
    with open(FLAGS.rows, "a") as f:
      f.write(json.dumps(row, default=float) + "\n")
    print(common.format_table([row], COLUMNS), flush=True)
  print(common.format_table(read_rows(FLAGS.rows), COLUMNS))


if __name__ == "__main__":
  app.run(main)
