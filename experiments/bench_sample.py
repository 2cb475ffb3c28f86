"""Sampling speed: DDIM and DPM-Solver++ images/s at several batch sizes, against PyTorch.

For each model, batch size and sampler, times one jitted `jaxdiff.diffusion.sample` call (the whole
reverse process is one `lax.scan`) and, as its baseline, bare forward passes in one jitted
`lax.scan` of the model alone (on CPU 10 of them, scaled to the sampler's count); the sampler's
overhead is `sampler time / forward-pass time - 1`. With --torch, the same architecture in diffusers sampled
by diffusers' DDIMScheduler / DPMSolverMultistepScheduler (eager loop), and its bare forwards; each
jaxdiff call and its diffusers counterpart are timed side by side, in alternating rounds.

Each record also gives both sides' achieved GFLOP/s (the model's matmul and convolution FLOPs per
forward times the sampler's forwards, over the sampler's time) and the `ceiling`: the highest
jax/torch ratio this machine's best measured matmul (XLA's or PyTorch's [2048, 2048] float32
matmul, measured at the start of the run) allows against diffusers' achieved rate
(`common.speedup_ceiling`).

  python experiments/bench_sample.py --models=dit-s/2 --batch_sizes=4,16 \
      --out=experiments/results/sample_dit-s2_cpu.json

Models are randomly initialised: speed does not depend on the weights.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import common, train_setup  # noqa: E402
from jaxdiff import diffusion  # noqa: E402
from jaxdiff.models import build_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["dit-s/2", "unet-ddpm-cifar10"], "Models to sample from.")
flags.DEFINE_list("samplers", ["ddim:50", "dpmpp_2m:20"], "method:steps pairs.")
flags.DEFINE_list("batch_sizes", [], "Batch sizes; empty = 2,8 on CPU, 64,256 elsewhere.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("warmup", -1, "Untimed runs after compilation; -1 = 0 on CPU, 1 elsewhere.")
flags.DEFINE_integer("iters", 0, "Timed runs (median reported); 0 = 1 on CPU, 5 elsewhere.")
flags.DEFINE_integer("forward_evals", -1,
                     "Bare forward passes timed for the baseline, scaled to the sampler's count; "
                     "-1 = 10 on CPU, the sampler's own count elsewhere.")
flags.DEFINE_bool("torch", True, "Also time the diffusers reference sampler.")
flags.DEFINE_string("out", "experiments/results/bench_sample.json", "JSON output path.")

COLUMNS = [("model", "model", ""), ("sampler", "sampler", ""), ("batch", "batch", "d"),
           ("compile_s", "compile (s)", ".1f"), ("sample_s", "sample (s)", ".2f"),
           ("images_per_s", "img/s", ".2f"), ("overhead", "overhead vs fwd", ".1%"),
           ("torch_images_per_s", "torch img/s", ".2f"),
           ("torch_overhead", "torch overhead", ".1%"), ("speedup", "jax/torch", ".2f"),
           ("gflops_per_s", "GFLOP/s", ".0f"), ("torch_gflops_per_s", "torch GFLOP/s", ".0f"),
           ("ceiling", "ceiling", ".2f")]


def _settings() -> tuple[list[int], int, int]:
  on_cpu = jax.devices()[0].platform == "cpu"
  batches = [int(b) for b in FLAGS.batch_sizes] or ([2, 8] if on_cpu else [64, 256])
  warmup = FLAGS.warmup if FLAGS.warmup >= 0 else (0 if on_cpu else 1)
  iters = FLAGS.iters or (1 if on_cpu else 5)
  return batches, warmup, iters


def model_and_params(model_name: str):
  """A randomly initialised model at 32x32x3 (class-conditional for DiTs) and its params."""
  conditional = train_setup.is_class_conditional(model_name)
  model = build_model(model_name, num_classes=10 if conditional else 0,
                      class_dropout_prob=0.1 if conditional else 0.0,
                      dtype=getattr(jnp, FLAGS.dtype))
  init = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1,), jnp.int32) if conditional else None)["params"])
  return model, init(jax.random.key(0)), conditional


def number_of_evaluations(method: str, num_steps: int) -> int:
  """Network evaluations per sample: one per step for DDIM and DPM-Solver++ 2M."""
  return 2 * num_steps - 1 if method == "heun" else num_steps


def baseline_evaluations(evaluations: int) -> int:
  """How many bare forward passes to time (the result is scaled to `evaluations`)."""
  if FLAGS.forward_evals > 0:
    return min(FLAGS.forward_evals, evaluations)
  return min(10, evaluations) if jax.devices()[0].platform == "cpu" else evaluations


def jax_calls(model_name: str, method: str, num_steps: int, batch: int) -> tuple[dict, dict]:
  """Compiles the jitted sampler and a scan of bare forward passes.

  Returns:
    (record with compile times and FLOPs, {"sample": call, "forwards": call}).
  """
  model, params, conditional = model_and_params(model_name)
  schedule = diffusion.make_schedule("linear", 1000)
  key_x, key_y = jax.random.split(jax.random.key(1))
  x_T = jax.random.normal(key_x, (batch, 32, 32, 3))
  labels = jax.random.randint(key_y, (batch,), 0, 10) if conditional else None

  def model_fn(p, x, t):
    return model.apply({"params": p}, x, t, labels)

  def sample(p, x, key):
    return diffusion.sample(lambda x_t, t: model_fn(p, x_t, t), schedule, x, key,
                            method=method, num_steps=num_steps)

  timed_evaluations = baseline_evaluations(number_of_evaluations(method, num_steps))

  def forwards(p, x, key):
    del key
    steps = jnp.linspace(999, 0, timed_evaluations).astype(jnp.int32)
    body = lambda x_t, t: (model_fn(p, x_t, jnp.full((batch,), t)), None)
    return jax.lax.scan(body, x, steps)[0]

  args = (params, x_T, jax.random.key(2))
  record = {"model": model_name, "sampler": f"{method}:{num_steps}", "batch": batch,
            "dtype": FLAGS.dtype, "forwards_timed": timed_evaluations,
            "gflops_per_image_per_eval": train_setup.forward_flops_per_image(
                model, params, train_setup.CIFAR10_INFO, conditional) / 1e9}
  calls = {}
  for name, fn in (("sample", sample), ("forwards", forwards)):
    compiled, compile_times = common.compile_timed(fn, *args)
    record[f"{name}_compile_s"] = compile_times["lower_and_compile_s"]
    calls[name] = lambda c=compiled: c(*args)
  record["compile_s"] = record.pop("sample_compile_s")
  return record, calls


def torch_calls(model_name: str, method: str, num_steps: int, batch: int) -> dict:
  """The diffusers scheduler loop and the same number of bare forwards as jaxdiff's baseline."""
  from experiments import torch_reference  # pylint: disable=import-outside-toplevel
  timed_evaluations = baseline_evaluations(number_of_evaluations(method, num_steps))
  sample, forwards = torch_reference.make_sampler(model_name, method, num_steps, batch,
                                                  FLAGS.dtype, num_forwards=timed_evaluations)
  return {"torch_sample": common.torch_call(sample), "torch_forwards": common.torch_call(forwards)}


def bench(model_name: str, method: str, num_steps: int, batch: int, warmup: int,
          iters: int, peak_flops_per_s: float) -> dict:
  """One record: jaxdiff's sampler and bare forwards, and diffusers' with --torch, each pair
  timed side by side in alternating rounds; `peak_flops_per_s` is the machine's best matmul."""
  record, calls = jax_calls(model_name, method, num_steps, batch)
  if FLAGS.torch:
    calls.update(torch_calls(model_name, method, num_steps, batch))
  for part in ("sample", "forwards"):
    pair = {name: call for name, call in calls.items() if name.endswith(part)}
    for name, timing in common.time_side_by_side(pair, warmup=warmup, iters=iters).items():
      record[f"{name}_timing"] = timing
      record[f"{name}_s"] = timing["median_s"]
  evaluations = number_of_evaluations(method, num_steps)
  scale = evaluations / record["forwards_timed"]  # forwards scaled to the sampler's count
  record["images_per_s"] = batch / record["sample_s"]
  record["forwards_s"] *= scale
  record["overhead"] = record["sample_s"] / record["forwards_s"] - 1
  gflops_per_call = record["gflops_per_image_per_eval"] * evaluations * batch
  record["gflops_per_s"] = gflops_per_call / record["sample_s"]
  if FLAGS.torch:
    record["torch_forwards_s"] *= scale
    record["torch_images_per_s"] = batch / record["torch_sample_s"]
    record["torch_overhead"] = record["torch_sample_s"] / record["torch_forwards_s"] - 1
    record["speedup"] = record["images_per_s"] / record["torch_images_per_s"]
    record["torch_gflops_per_s"] = gflops_per_call / record["torch_sample_s"]
    record["ceiling"] = common.speedup_ceiling(record["torch_gflops_per_s"] * 1e9,
                                               peak_flops_per_s)
  return record


def main(argv):
  del argv
  batches, warmup, iters = _settings()
  info = common.machine_info()
  if FLAGS.torch:
    info["torch_threads"] = common.set_torch_threads()
  peak = common.measured_peak_flops(getattr(jnp, FLAGS.dtype))
  torch_peak = common.measured_torch_peak_flops(FLAGS.dtype) if FLAGS.torch else None
  best_peak = common.best_peak_flops(peak, torch_peak)
  print(f"{info['device_count']} x {info['device_kind']} ({info['platform']}), "
        f"load {info['loadavg_start']}; peak matmul GFLOP/s: XLA "
        f"{peak['peak_flops_per_s'] / 1e9:.0f}"
        + (f", PyTorch {torch_peak['peak_flops_per_s'] / 1e9:.0f}" if torch_peak else ""))
  records = []
  for model_name in FLAGS.models:
    for sampler in FLAGS.samplers:
      method, num_steps = sampler.split(":")
      for batch in batches:
        record = bench(model_name, method, int(num_steps), batch, warmup, iters, best_peak)
        record["loadavg"] = os.getloadavg()
        records.append(record)
        print(common.format_table([record], COLUMNS).splitlines()[-1], flush=True)
        common.write_json(FLAGS.out, {  # after every record: a long run keeps what it measured
            "benchmark": "sampling", "machine": info, "peak_matmul": {FLAGS.dtype: peak},
            "torch_peak_matmul": {FLAGS.dtype: torch_peak} if torch_peak else {},
            "settings": {"batch_sizes": batches, "iters": iters, "warmup": warmup,
                         "dtype": FLAGS.dtype, "samplers": FLAGS.samplers},
            "records": records})
  print(f"\nSampling ({FLAGS.dtype}), median of {iters} run(s) after {warmup} warm-up; "
        f"load average at the end {os.getloadavg()}")
  print(common.format_table(records, COLUMNS))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
