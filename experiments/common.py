"""Shared helpers for the benchmark scripts: timing, FLOPs, peak FLOP/s, memory, tables, JSON.

Every benchmark in `experiments/` measures in the same way:
- compile time: `jax.jit(f).lower(*args)` then `.compile()`, both timed (`compile_timed`);
- step time: the median of `iters` calls after `warmup` calls, each ended by
  `jax.block_until_ready` (`time_calls`);
- model FLOPs: XLA's `compiled.cost_analysis()["flops"]`. XLA's cost analysis counts the body of
  a `while` loop (every `lax.scan`) once, not once per iteration, so `jaxpr_flops` also counts the
  matmul and convolution FLOPs of the jaxpr, multiplying scan bodies by their length; when a loop
  body runs more than once, the jaxpr count is the one used (`model_flops`). Both leave out a
  convolution's taps on padding, which multiply zeros;
- peak FLOP/s: the best of a few large matmuls in the same process, in XLA
  (`measured_peak_flops`) and in PyTorch (`measured_torch_peak_flops`); the better of the two is
  this machine's measured matmul peak, and `speedup_ceiling` turns it into the highest
  side-by-side ratio that peak allows;
- memory: `device.memory_stats()["peak_bytes_in_use"]` where the backend has it (GPU, TPU), else
  the XLA buffer sizes of the compiled program and the process's peak resident set size;
- side by side: jaxdiff and its PyTorch reference are timed in alternating rounds
  (`time_side_by_side`), so a drift of the machine's speed during the run (clock changes,
  neighbours on the host) reaches both sides alike;
- load: every timed section records the 1-minute load average at its start and end, and the CPU
  time that *other* processes used during it (`other_cpu`, in cores: the machine's busy time from
  /proc/stat, steal included, minus this process's own CPU time, over the wall time). A figure
  taken while other jobs share the cores is noise, so `write_json` refuses to write a result when
  the load average was above --max_load (default 1.5, for this project's 2-core machine) when
  the run started, or when other processes used more than --max_other_cpu cores during any timed
  section, unless --force is given; a forced result is written with `"quiet": false` and must not
  be quoted as a speed claim. The load average at the end of a section is recorded but cannot be
  the test: the benchmark's own two threads raise the 1-minute average towards 2 within a minute
  on a quiet 2-core machine.
"""

import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_MAX_LOAD = flags.DEFINE_float(
    "max_load", 1.5, "Highest 1-minute load average allowed when the run starts; a result "
    "measured above it is not written (see --force).")
_MAX_OTHER_CPU = flags.DEFINE_float(
    "max_other_cpu", 0.25, "Most cores that other processes may keep busy, on average, during a "
    "timed section; a result measured above it is not written (see --force).")
_FORCE = flags.DEFINE_bool(
    "force", False, "Write the result even if the machine was not quiet (marked quiet=false), "
    "for machines that are never quiet.")

# Model FLOPs come from these primitives; elementwise work is not counted (the usual MFU
# convention, as in PaLM's appendix B).
_MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")


# Whether `run` applied jaxdiff.cli.keep_host_memory (None: not started through `run`).
_HOST_MEMORY_KEPT = None


def processor(cpuinfo: str | None = None) -> str | None:
  """The processor, as "model name (vendor, family F model M), AVX-512: yes|no", from the first
  block of /proc/cpuinfo (or of `cpuinfo`, its text); None where there is no such file.

  Benchmarks record it because the machines lent to this project differ from one session to the
  next (an Intel Xeon, an AMD EPYC of two generations), and XLA's and PyTorch's kernels rank
  differently on each (experiments/README.md, findings 13 and 14).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return None
  fields = {}
  for line in cpuinfo.split("\n\n")[0].splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  if "model name" not in fields:
    return None
  avx512 = "yes" if "avx512f" in fields.get("flags", "").split() else "no"
  return (f"{fields['model name']} ({fields.get('vendor_id', '?')}, family "
          f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}), AVX-512: {avx512}")


def machine_info() -> dict:
  """Describes the machine and the software, for the JSON record."""
  device = jax.devices()[0]
  info = {
      "date": datetime.date.today().isoformat(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "cpu": platform.processor() or platform.machine(),
      "processor": processor(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "loadavg_start": os.getloadavg(),
      "host_memory_kept": _HOST_MEMORY_KEPT,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import torch  # pylint: disable=import-outside-toplevel
    info["torch"] = torch.__version__
  except ImportError:
    pass
  return info


def sync(tree: Any) -> Any:
  """Waits for every array in `tree` (JAX dispatch is asynchronous)."""
  return jax.block_until_ready(tree)


def compile_timed(fn: Callable, *args, **jit_kwargs) -> tuple[Any, dict]:
  """Jits, lowers and compiles `fn` for `args`; returns (compiled, {lower_s, compile_s})."""
  start = time.perf_counter()
  lowered = jax.jit(fn, **jit_kwargs).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return compiled, {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
                    "lower_and_compile_s": done - start}


def machine_busy_seconds() -> float | None:
  """CPU seconds all cores have spent busy since boot (steal included), from /proc/stat; None
  where there is no /proc/stat."""
  try:
    with open("/proc/stat") as f:
      fields = [float(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
  busy = sum(fields[:8]) - fields[3] - fields[4]
  return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
  """CPU seconds used by this process and its finished child processes (the commands a
  benchmark runs, e.g. experiments/first_run/search.py's train and sample runs)."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


class LoadMeter:
  """The load around one timed section: the 1-minute load average at its start and end, and the
  cores that other processes kept busy during it (machine busy time minus this process's and
  its finished children's)."""

  def __init__(self):
    self.load_start = os.getloadavg()[0]
    self.busy_start = machine_busy_seconds()
    self.own_start = own_cpu_seconds()
    self.wall_start = time.perf_counter()

  def record(self) -> dict:
    """{"load_start", "load_end", "other_cpu"} (other_cpu None without /proc/stat)."""
    wall = time.perf_counter() - self.wall_start
    busy = machine_busy_seconds()
    other = None
    if busy is not None and self.busy_start is not None and wall > 0:
      own = own_cpu_seconds() - self.own_start
      other = max(0.0, (busy - self.busy_start - own) / wall)
    return {"load_start": self.load_start, "load_end": os.getloadavg()[0], "other_cpu": other}


def _summary(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "iters": len(times), "times_s": times}


def time_calls(call: Callable[[], Any], *, warmup: int, iters: int) -> dict:
  """Times `call()` (which returns arrays) `iters` times after `warmup` untimed calls.

  Returns:
    {"median_s", "min_s", "max_s", "iters", "times_s"} and the `LoadMeter` record of the timed
    calls ("load_start", "load_end", "other_cpu").
  """
  return time_side_by_side({"call": call}, warmup=warmup, iters=iters)["call"]


def time_side_by_side(calls: dict[str, Callable[[], Any]], *, warmup: int,
                      iters: int) -> dict[str, dict]:
  """Times several calls in alternating rounds (a, b, a, b, ...) after `warmup` rounds.

  Each call must return only when its work is done (wrap PyTorch calls with `torch_call`).

  Returns:
    name -> `time_calls`'s record; the load fields cover the whole alternating section.
  """
  for _ in range(warmup):
    for call in calls.values():
      sync(call())
  times = {name: [] for name in calls}
  meter = LoadMeter()
  for _ in range(iters):
    for name, call in calls.items():
      start = time.perf_counter()
      sync(call())
      times[name].append(time.perf_counter() - start)
  load = meter.record()
  return {name: {**_summary(t), **load} for name, t in times.items()}


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program from XLA's cost analysis (a dict, or a list of one per device)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def has_repeated_loop(jaxpr) -> bool:
  """Whether `jaxpr` runs some body more than once (a scan of length > 1, or a while loop)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while" or (
        eqn.primitive.name == "scan" and eqn.params["length"] > 1):
      return True
    if any(has_repeated_loop(j) for v in eqn.params.values() for j in _sub_jaxprs(v)):
      return True
  return False


def _sub_jaxprs(value) -> list:
  """The jaxprs held in one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (list, tuple)):
    return [j for item in value for j in _sub_jaxprs(item)]
  return []


def _window_taps_on_input(in_size: int, out_size: int, window: int, stride: int, pad_low: int,
                          lhs_dilation: int, rhs_dilation: int) -> int:
  """How many (output position, window tap) pairs of one spatial axis read a real input element.

  Taps that fall on padding, or between the elements of an lhs-dilated (transposed) input,
  multiply zeros and are not counted; XLA's cost analysis does not count them either.
  """
  dilated_in = (in_size - 1) * lhs_dilation + 1
  return sum(1 for o in range(out_size) for k in range(window)
             if 0 <= (q := o * stride + k * rhs_dilation - pad_low) < dilated_in
             and q % lhs_dilation == 0)


def _equation_flops(eqn) -> float:
  """Matmul / convolution FLOPs of one equation (2 per multiply-add on real input elements)."""
  out_shape = eqn.outvars[0].aval.shape
  out_size = math.prod(out_shape)
  if eqn.primitive.name == "dot_general":
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    return 2.0 * out_size * math.prod(lhs_shape[d] for d in lhs_contracting)
  # conv_general_dilated: each output element is a dot over rhs.size / out_features weights,
  # less the taps that land on padding (per spatial axis).
  params, lhs_shape, rhs_shape = eqn.params, eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  numbers = params["dimension_numbers"]
  full = 2.0 * out_size * math.prod(rhs_shape) / rhs_shape[numbers.rhs_spec[0]]
  for axis, (lhs_dim, rhs_dim, out_dim) in enumerate(
      zip(numbers.lhs_spec[2:], numbers.rhs_spec[2:], numbers.out_spec[2:])):
    window, out_len = rhs_shape[rhs_dim], out_shape[out_dim]
    taps = _window_taps_on_input(
        lhs_shape[lhs_dim], out_len, window, params["window_strides"][axis],
        params["padding"][axis][0], params["lhs_dilation"][axis], params["rhs_dilation"][axis])
    full *= taps / (out_len * window)
  return full


def _count_jaxpr(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _MATMUL_PRIMITIVES:
      total += _equation_flops(eqn)
      continue
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counts = [_count_jaxpr(j) for j in subs]
    if eqn.primitive.name == "cond":
      total += max(counts)  # one branch runs
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * sum(counts)
    else:  # pjit, remat, custom_jvp/vjp, while (trip count unknown: counted once)
      total += sum(counts)
  return total


def jaxpr_flops(fn: Callable, *args) -> float:
  """Matmul + convolution FLOPs of `fn(*args)`, scan bodies counted once per iteration."""
  return _count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)


def model_flops(fn: Callable, args: Sequence, compiled) -> dict:
  """FLOPs per call of `fn`: XLA's count, the jaxpr count, and which one MFU uses (`flops`).

  XLA's count (which includes elementwise work) is used unless a loop body runs more than once
  (e.g. `scan_blocks`), where XLA would count it once; a length-1 scan such as the train loop's
  `multi_step` with one step per dispatch is counted correctly by both.
  """
  from_xla = xla_flops(compiled)
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  from_jaxpr = _count_jaxpr(jaxpr)
  loop = has_repeated_loop(jaxpr)
  use_xla = from_xla is not None and not loop
  return {"flops": from_xla if use_xla else from_jaxpr,
          "flops_source": "xla_cost_analysis" if use_xla else "jaxpr_matmul_count",
          "xla_flops": from_xla, "jaxpr_matmul_flops": from_jaxpr, "repeated_loop": loop}


def measured_peak_flops(dtype: Any, *, size: int | None = None, repeats: int = 5) -> dict:
  """Peak FLOP/s of this device, measured as the best of `repeats` [n, n] @ [n, n] matmuls.

  Args:
    dtype: jnp.float32 or jnp.bfloat16 (float32 matmuls use the default precision, e.g. TF32
      on H100 and bf16 passes on TPU, as the models do).
    size: n; defaults to 2048 on CPU and 8192 on accelerators.
  """
  device = jax.devices()[0]
  n = size or (2048 if device.platform == "cpu" else 8192)
  chain = 1 if device.platform == "cpu" else 8  # several matmuls per call hide dispatch

  def matmuls(a, b):
    for _ in range(chain):
      a = (a @ b) * 0.5
    return a

  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype) / math.sqrt(n)
  compiled, _ = compile_timed(matmuls, a, b)
  timing = time_calls(lambda: compiled(a, b), warmup=1, iters=repeats)
  return _peak_record(jnp.dtype(dtype).name, n, chain, timing)


def _peak_record(dtype: str, n: int, matmuls_per_call: int, timing: dict) -> dict:
  """The peak and median FLOP/s of calls of `matmuls_per_call` [n, n] matmuls, from `timing`."""
  flops = 2.0 * n ** 3 * matmuls_per_call
  return {"dtype": dtype, "n": n, "matmuls_per_call": matmuls_per_call,
          "peak_flops_per_s": flops / timing["min_s"],
          "median_flops_per_s": flops / timing["median_s"]}


def measured_torch_peak_flops(dtype: str, *, size: int | None = None, repeats: int = 5) -> dict:
  """PyTorch's peak FLOP/s here: the best of `repeats` [n, n] @ [n, n] `torch.mm` calls.

  The reference side's counterpart of `measured_peak_flops` (oneDNN or MKL on CPU, cuBLAS on a
  GPU), with the same n and the same kind of record.

  Args:
    dtype: "float32" or "bfloat16".
    size: n; defaults to 2048 on CPU and 8192 on a GPU.
  """
  import torch  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  n = size or (8192 if device == "cuda" else 2048)
  generator = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=generator).to(device, getattr(torch, dtype))
  b = (torch.randn(n, n, generator=generator) / math.sqrt(n)).to(device, getattr(torch, dtype))
  with torch.inference_mode():
    timing = torch_time_calls(lambda: torch.mm(a, b), warmup=1, iters=repeats)
  return _peak_record(dtype, n, 1, timing)


def best_peak_flops(*peaks: dict | None) -> float:
  """The machine's measured matmul peak: the best `peak_flops_per_s` of the given records."""
  return max(p["peak_flops_per_s"] for p in peaks if p is not None)


def speedup_ceiling(reference_flops_per_s: float, peak_flops_per_s: float) -> float:
  """The highest jax/reference ratio this machine allows for a compute-bound program.

  A program whose model FLOPs are all matmuls and convolutions cannot run them faster than the
  machine's best matmul, even if every other op were free. So against a reference that achieves
  `reference_flops_per_s` on the same FLOPs, jaxdiff's side-by-side ratio is at most
  `peak_flops_per_s / reference_flops_per_s`. A target above this ceiling cannot be met on this
  machine by any implementation of the same arithmetic.
  """
  return peak_flops_per_s / reference_flops_per_s


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
  return flops_per_step / step_time_s / peak_flops_per_s


def memory_record(compiled=None) -> dict:
  """Peak memory: the device's own counter where it has one, else XLA buffers and process RSS."""
  record = {}
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    record["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  if compiled is not None:
    analysis = compiled.memory_analysis()
    if analysis is not None:
      record["xla_step_bytes"] = int(analysis.argument_size_in_bytes
                                     + analysis.output_size_in_bytes
                                     + analysis.temp_size_in_bytes
                                     - analysis.alias_size_in_bytes)
      record["xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
  # ru_maxrss is in KiB on Linux; a process-wide high-water mark over everything run so far.
  record["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return record


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def torch_call(call: Callable[[], Any]) -> Callable[[], None]:
  """`call` made to return only when its work is done (synchronises CUDA if the reference runs
  on a GPU); returns None, so the result is not kept alive between timings."""
  import torch  # pylint: disable=import-outside-toplevel
  synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

  def timed():
    call()
    synchronize()
  return timed


def torch_time_calls(call: Callable[[], Any], *, warmup: int, iters: int) -> dict:
  """`time_calls` for PyTorch."""
  return time_calls(torch_call(call), warmup=warmup, iters=iters)


def set_torch_threads() -> int:
  """Gives PyTorch the same cores as XLA's CPU client (all of them); returns the count."""
  import torch  # pylint: disable=import-outside-toplevel
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  return threads


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
  """Formats rows as a Markdown table; columns are (key, header, format spec), e.g. ".2f"."""
  def cell(row, key, spec):
    value = row.get(key)
    if value is None:
      return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)

  header = "| " + " | ".join(h for _, h, _ in columns) + " |"
  rule = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
  return "\n".join([header, rule, *body])


def timings(tree: Any) -> list[dict]:
  """Every timing record (a dict with "load_start") in `tree` (nested dicts and lists)."""
  if isinstance(tree, dict):
    own = [tree] if "load_start" in tree else []
    return own + [t for v in tree.values() if isinstance(v, (dict, list)) for t in timings(v)]
  if isinstance(tree, list):
    return [t for v in tree for t in timings(v)]
  return []


class NotQuiet(RuntimeError):
  """A timed section ran while the machine was loaded; its result is not written."""


def check_quiet(payload: dict) -> dict:
  """Returns `payload` with the load summary and "quiet"; NotQuiet if loaded and not --force.

  Quiet: the load average at the start of the run (payload["machine"]["loadavg_start"], else
  the first timing's) was at most --max_load, and other processes used at most --max_other_cpu
  cores during every timed section.
  """
  records = timings(payload)
  start = payload.get("machine", {}).get("loadavg_start")
  start_load = float(start[0]) if start else (records[0]["load_start"] if records else 0.0)
  other = max((float(t["other_cpu"]) for t in records if t.get("other_cpu") is not None),
              default=0.0)
  problems = []
  if start_load > _MAX_LOAD.value:
    problems.append(f"the load average was {start_load:.2f} when the run started (above "
                    f"--max_load={_MAX_LOAD.value})")
  if other > _MAX_OTHER_CPU.value:
    problems.append(f"other processes kept {other:.2f} cores busy during a timed section "
                    f"(above --max_other_cpu={_MAX_OTHER_CPU.value})")
  if problems and not _FORCE.value:
    raise NotQuiet(" and ".join(problems) + ": stop other jobs and run again, or pass --force "
                   "to write it marked quiet=false")
  return {**payload, "start_load": start_load, "max_load_allowed": _MAX_LOAD.value,
          "max_other_cpu": other, "max_other_cpu_allowed": _MAX_OTHER_CPU.value,
          "quiet": not problems}


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` with the load average at the end of the run added.

  Raises:
    NotQuiet: a timing in `payload` was taken above --max_load and --force is not set; nothing
      is written (an earlier quiet result at `path` is kept).
  """
  payload = check_quiet({**payload, "loadavg_end": os.getloadavg()})
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=_json_default)
    f.write("\n")


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)`, turning NotQuiet into one `error:` line and exit status 2.

  Applies `jaxdiff.cli.prepare_process` first (host memory kept, XLA's own convolutions and
  matmuls), as every jaxdiff command does (so on CPU a PyTorch reference timed in the same process
  runs with the same malloc settings, and jaxdiff with the commands' XLA flags).
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  from jaxdiff import cli  # pylint: disable=import-outside-toplevel

  global _HOST_MEMORY_KEPT
  _HOST_MEMORY_KEPT = cli.prepare_process()

  def guarded(argv):
    try:
      return main(argv)
    except NotQuiet as error:
      cli.fail(error)
  app.run(guarded)
