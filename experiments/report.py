"""Prints the Markdown tables of experiments/README.md from the JSON files of the benchmarks.

  python experiments/report.py --results=experiments/results
"""

import glob
import json
import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("results", "experiments/results", "Folder of bench_*.py JSON files.")

TRAIN_COLUMNS = [
    ("model", "model", ""), ("matmuls", "XLA:CPU matmuls", ""), ("dtype", "dtype", ""),
    ("variant", "step", ""),
    ("batch", "batch", "d"), ("params_m", "params (M)", ".1f"),
    ("compile_s", "compile (s)", ".0f"), ("step_s", "step (s)", ".2f"),
    ("images_per_s", "img/s", ".3f"), ("gflops_per_image", "train GFLOP/img", ".1f"),
    ("achieved_gflops", "GFLOP/s", ".1f"), ("peak_gflops", "matmul peak GFLOP/s", ".1f"),
    ("mfu", "MFU", ".0%"), ("step_gib", "XLA step mem (GiB)", ".2f"),
    ("torch_images_per_s", "torch img/s", ".3f"), ("speedup", "jax/torch", ".2f"),
    ("torch_gflops_per_s", "torch GFLOP/s", ".0f"), ("ceiling", "ceiling", ".2f"),
    ("load", "load avg (1 min)", ".1f"), ("other_cpu", "others' cores", ".2f")]
SAMPLE_COLUMNS = [
    ("model", "model", ""), ("matmuls", "XLA:CPU matmuls", ""), ("sampler", "sampler", ""),
    ("batch", "batch", "d"),
    ("compile_s", "compile (s)", ".0f"), ("sample_s", "jax (s)", ".1f"),
    ("images_per_s", "jax img/s", ".4f"), ("overhead", "jax overhead", ".1%"),
    ("torch_sample_s", "torch (s)", ".1f"), ("torch_images_per_s", "torch img/s", ".4f"),
    ("torch_overhead", "torch overhead", ".1%"), ("speedup", "jax/torch", ".2f"),
    ("gflops_per_s", "jax GFLOP/s", ".0f"), ("torch_gflops_per_s", "torch GFLOP/s", ".0f"),
    ("ceiling", "ceiling", ".2f"),
    ("load", "load avg (1 min)", ".1f"), ("other_cpu", "others' cores", ".2f")]


def _load(pattern: str) -> list[dict]:
  """The quiet results matching `pattern`; results measured under load are left out, not shown."""
  payloads = []
  for path in sorted(glob.glob(os.path.join(FLAGS.results, pattern))):
    with open(path) as f:
      payload = json.load(f)
    if payload.get("quiet") is not True:
      print(f"- left out {path}: not measured on a quiet machine (load at the start "
            f"{payload.get('start_load', 'unrecorded')}, others' cores "
            f"{payload.get('max_other_cpu', 'unrecorded')})")
      continue
    payloads.append(payload)
  return payloads


def matmul_library(machine: dict) -> str:
  """The library XLA:CPU ran a result's matmuls with, read from its recorded XLA_FLAGS
  (`jaxdiff.cli.choose_xla_cpu_kernels`): "oneDNN", "XLA" (its own, with `individual_dot` taken
  from YNNPACK's fusions), "YNNPACK" (jax 0.10's default), or "-" for an accelerator or a result
  that did not record its flags."""
  if machine.get("platform") != "cpu" or "xla_flags" not in machine:
    return "-"
  flags = machine["xla_flags"]
  if "--xla_cpu_use_onednn=true" in flags:
    return "oneDNN"
  return "XLA" if re.search(r"ynn_fusion_type=\S*-individual_dot", flags) else "YNNPACK"


def train_rows(payloads: list[dict]) -> list[dict]:
  rows = []
  for payload in payloads:
    for record in payload["records"]:
      peak = payload["peak_matmul"][record["dtype"]]["peak_flops_per_s"]
      memory = record["memory"].get("device_peak_bytes", record["memory"].get("xla_step_bytes"))
      rows.append({**record, "variant": record.get("variant", "cli"),
                   "matmuls": matmul_library(payload["machine"]),
                   "achieved_gflops": record["achieved_tflops"] * 1e3, "peak_gflops": peak / 1e9,
                   "step_gib": memory / 2**30, "load": record["loadavg"][0],
                   "other_cpu": record["timing"].get("other_cpu")})
  return rows


def main(argv):
  del argv
  train = _load("train_*.json")
  sample = _load("sample_*.json")
  for payload in train + sample:
    machine = payload["machine"]
    print(f"- {payload['benchmark']}: {machine['device_count']} x {machine['device_kind']} "
          f"({machine['cpu_count']} CPUs; {machine.get('processor') or 'processor not recorded'}), "
          f"{machine['date']}, jax {machine['jax']}, "
          f"torch {machine.get('torch')}, load {machine['loadavg_start'][0]:.1f} -> "
          f"{payload['loadavg_end'][0]:.1f}")
  print("\n" + common.format_table(train_rows(train), TRAIN_COLUMNS))
  scans = [s for payload in train for s in payload.get("scan_compile", [])]
  for scan in scans:
    print(f"\n{scan['model']} float32 step compile with scan_blocks=True: "
          f"{scan['lower_and_compile_s']:.0f} s")
  rows = [{**r, "matmuls": matmul_library(payload["machine"]), "load": r["loadavg"][0],
           "other_cpu": r["sample_timing"].get("other_cpu")}
          for payload in sample for r in payload["records"]]
  print("\n" + common.format_table(rows, SAMPLE_COLUMNS))


if __name__ == "__main__":
  app.run(main)
