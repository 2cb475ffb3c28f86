"""Train-step speed: images/s, step time, compile time, memory and MFU, against PyTorch.

Times jaxdiff's real jitted train step (`jaxdiff.train.builder.make_step_fn`: loss, backward,
clipping, AdamW, EMA; state donated) on a fixed 32x32x3 batch for each model and compute dtype,
and, with --torch, the same architecture in diffusers with an AdamW step on the same batch
(see experiments/torch_reference.py). MFU = XLA's FLOPs of the step / step time / the peak
FLOP/s of a large matmul measured at the start of the same run.

  python experiments/bench_train.py --models=dit-s/2 --dtypes=float32,bfloat16 \
      --out=experiments/results/train_dit-s2_cpu.json

Defaults suit a small CPU (batch 8, 3 timed steps); on a GPU/TPU pass e.g. --batch_size=256
--iters=50.
"""

import dataclasses
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import common, train_setup  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["dit-s/2", "dit-b/2", "unet-ddpm-cifar10"], "Models to time.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = 8 on CPU, 128 on accelerators.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
flags.DEFINE_integer("iters", 0, "Timed steps (median reported); 0 = 3 on CPU, 30 elsewhere.")
flags.DEFINE_list("variants", ["cli"],
                  "cli: the CLI's jitted step (multi_step, a length-1 lax.scan); single: the same "
                  "train_step jitted without the scan (an experiment, see train_setup).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch/diffusers reference step.")
flags.DEFINE_integer("channels", 3, "Input channels: 3 for 32x32 RGB images, 4 for the 32x32x4 "
                     "latents of a 256x256 image (the DiT paper's ImageNet setting; a latent run "
                     "trains on cached latents, so its step is this one). The PyTorch reference "
                     "exists for 3 channels only.")
flags.DEFINE_bool("scan_compile", True,
                  "For DiTs, also compile (not run) the step with scan_blocks=True.")
flags.DEFINE_string("out", "experiments/results/bench_train.json", "JSON output path.")

COLUMNS = [("model", "model", ""), ("dtype", "dtype", ""), ("variant", "step", ""),
           ("batch", "batch", "d"),
           ("params_m", "params (M)", ".1f"), ("compile_s", "compile (s)", ".1f"),
           ("step_s", "step (s)", ".3f"), ("images_per_s", "img/s", ".2f"),
           ("gflops_per_image", "GFLOP/img", ".1f"), ("mfu", "MFU", ".1%"),
           ("step_mib", "step mem (MiB)", ".0f"), ("torch_images_per_s", "torch img/s", ".2f"),
           ("speedup", "jax/torch", ".2f"), ("torch_gflops_per_s", "torch GFLOP/s", ".0f"),
           ("ceiling", "ceiling", ".2f")]


def _defaults() -> tuple[int, int]:
  on_cpu = jax.devices()[0].platform == "cpu"
  batch = FLAGS.batch_size or (8 if on_cpu else 128)
  iters = FLAGS.iters or (3 if on_cpu else 30)
  return batch, iters


def bench_jax(model_name: str, dtype: str, variant: str, batch: int, iters: int,
              peak: dict, torch_step=None) -> dict:
  """Compiles and times jaxdiff's train step; returns one record.

  With `torch_step` (a `common.torch_call`), the reference step is timed side by side with
  jaxdiff's, in alternating rounds, and its timing is added as "torch_timing".
  """
  info = dataclasses.replace(train_setup.CIFAR10_INFO, channels=FLAGS.channels)
  bench = train_setup.make_train_bench(model_name, dtype, batch, info=info)
  if variant == "single":
    bench = train_setup.single_step_variant(bench)
  args = (bench.state, bench.batches, bench.key)
  compiled, compile_times = common.compile_timed(bench.step_fn, *args)
  flops = common.model_flops(bench.step_fn, args, compiled)
  holder = {"state": bench.state}

  def call():
    holder["state"], metrics = compiled(holder["state"], bench.batches, bench.key)
    return metrics

  calls = {"jax": call} if torch_step is None else {"jax": call, "torch": torch_step}
  timings = common.time_side_by_side(calls, warmup=FLAGS.warmup, iters=iters)
  timing = timings["jax"]
  memory = common.memory_record(compiled)
  step_s = timing["median_s"]
  return {
      "model": model_name, "dtype": dtype, "variant": variant, "batch": batch,
      "channels": FLAGS.channels,
      "params_m": common.param_count(bench.state.params) / 1e6,
      "compile_s": compile_times["lower_and_compile_s"], **compile_times,
      "step_s": step_s, "images_per_s": batch / step_s, "timing": timing,
      "gflops_per_image": flops["flops"] / batch / 1e9, **flops,
      "achieved_tflops": flops["flops"] / step_s / 1e12,
      "mfu": common.mfu(flops["flops"], step_s, peak[dtype]["peak_flops_per_s"]),
      "step_mib": memory.get("device_peak_bytes", memory.get("xla_step_bytes", 0)) / 2**20,
      "memory": memory, **({} if torch_step is None else {
          "torch_step_s": timings["torch"]["median_s"], "torch_timing": timings["torch"],
          "torch_images_per_s": batch / timings["torch"]["median_s"]})}


def scan_compile_time(model_name: str, batch: int) -> dict:
  """Compile time of the float32 DiT step with the blocks under one `nn.scan`."""
  bench = train_setup.make_train_bench(model_name, "float32", batch, scan_blocks=True)
  _, times = common.compile_timed(bench.step_fn, bench.state, bench.batches, bench.key)
  return {"model": model_name, "scan_blocks": True, **times}


def torch_step(model_name: str, dtype: str, batch: int) -> tuple[Callable[[], None], float]:
  """The diffusers reference train step (eager PyTorch) and its parameter count in millions."""
  from experiments import torch_reference  # pylint: disable=import-outside-toplevel
  step, num_params = torch_reference.make_train_step(model_name, batch, dtype)
  return common.torch_call(step), num_params / 1e6


def main(argv):
  del argv
  batch, iters = _defaults()
  info = common.machine_info()
  if FLAGS.torch:
    info["torch_threads"] = common.set_torch_threads()
  peak = {d: common.measured_peak_flops(getattr(jnp, d)) for d in FLAGS.dtypes}
  torch_peak = ({d: common.measured_torch_peak_flops(d) for d in FLAGS.dtypes}
                if FLAGS.torch else {})
  print(f"{info['device_count']} x {info['device_kind']} ({info['platform']}), "
        f"load {info['loadavg_start']}; peak matmul TFLOP/s: "
        + ", ".join(f"{d} {p['peak_flops_per_s'] / 1e12:.3f}" for d, p in peak.items())
        + "".join(f"; PyTorch {d} {p['peak_flops_per_s'] / 1e12:.3f}"
                  for d, p in torch_peak.items()))
  records, scan_records = [], []
  save = lambda: common.write_json(FLAGS.out, {
      "benchmark": "train_step", "machine": info, "peak_matmul": peak,
      "torch_peak_matmul": torch_peak,
      "settings": {"batch_size": batch, "iters": iters, "warmup": FLAGS.warmup,
                   "channels": FLAGS.channels},
      "records": records, "scan_compile": scan_records})
  for model_name in FLAGS.models:
    for dtype in FLAGS.dtypes:
      for variant in FLAGS.variants:
        reference, torch_params_m = (torch_step(model_name, dtype, batch)
                                     if FLAGS.torch and FLAGS.channels == 3
                                     and variant == FLAGS.variants[0]
                                     else (None, None))
        record = bench_jax(model_name, dtype, variant, batch, iters, peak, reference)
        if reference is not None:
          record["torch_params_m"] = torch_params_m
          torch_rate = record["torch_images_per_s"]
        if FLAGS.torch and FLAGS.channels == 3:
          record["speedup"] = record["images_per_s"] / torch_rate
          record["torch_gflops_per_s"] = torch_rate * record["gflops_per_image"]
          record["ceiling"] = common.speedup_ceiling(
              record["torch_gflops_per_s"] * 1e9,
              common.best_peak_flops(peak[dtype], torch_peak.get(dtype)))
        record["loadavg"] = os.getloadavg()
        records.append(record)
        print(common.format_table([record], COLUMNS).splitlines()[-1], flush=True)
        save()  # after every record: a long run keeps what it measured
    if FLAGS.scan_compile and model_name.startswith("dit"):
      scan_records.append(scan_compile_time(model_name, batch))
      print(f"{model_name} float32 step compile with scan_blocks=True: "
            f"{scan_records[-1]['lower_and_compile_s']:.1f} s", flush=True)
      save()
  print(f"\nTrain step, median of {iters} steps after {FLAGS.warmup} warm-up; "
        f"load average at the end {os.getloadavg()}")
  print(common.format_table(records, COLUMNS))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
