"""Checks the benchmark helpers of experiments/common.py against hand computations, and the
command-line checks of experiments/score_digits.py."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common


def test_jaxpr_flops_of_dense_and_conv_match_hand_count():
  model = nn.Sequential([nn.Conv(16, (3, 3)), nn.Dense(32)])
  x = jnp.ones((2, 8, 8, 4))
  params = model.init(jax.random.key(0), x)
  flops = common.jaxpr_flops(lambda p: model.apply(p, x), params)
  # SAME padding: along each axis 8 outputs x 3 taps, less the 2 taps that read padding.
  conv = 2 * (2 * 16 * 4) * (8 * 3 - 2) ** 2  # 2 * batch * out * in features * taps on input
  dense = 2 * (2 * 8 * 8 * 32) * 16
  assert flops == conv + dense


@pytest.mark.parametrize("size,window,stride,padding,lhs_dilation,rhs_dilation", [
    (9, 3, 2, "SAME", 1, 1), (8, 3, 1, ((2, 1), (0, 2)), 2, 1), (7, 3, 1, "VALID", 1, 2),
    (16, 5, 2, ((1, 3), (2, 2)), 1, 1)])
def test_convolution_flops_leave_out_padding_as_xla_does(size, window, stride, padding,
                                                         lhs_dilation, rhs_dilation):
  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, lhs_dilation=(lhs_dilation,) * 2,
        rhs_dilation=(rhs_dilation,) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = jnp.ones((2, size, size, 4)), jnp.ones((window, window, 4, 6))
  compiled, _ = common.compile_timed(conv, x, w)
  assert common.jaxpr_flops(conv, x, w) == common.xla_flops(compiled)


def test_scan_body_is_counted_once_per_iteration():
  a = jnp.ones((64, 64))

  def repeated(a, b):
    return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=10)[0]

  compiled, _ = common.compile_timed(repeated, a, a)
  record = common.model_flops(repeated, (a, a), compiled)
  assert record["jaxpr_matmul_flops"] == 10 * 2 * 64 ** 3
  assert record["repeated_loop"]
  assert record["flops"] == record["jaxpr_matmul_flops"]  # XLA would count the body once


def test_xla_flops_are_used_without_loops():
  a = jnp.ones((32, 48))
  b = jnp.ones((48, 16))
  compiled, times = common.compile_timed(jnp.matmul, a, b)
  record = common.model_flops(jnp.matmul, (a, b), compiled)
  assert record["flops_source"] == "xla_cost_analysis"
  assert record["flops"] == pytest.approx(2 * 32 * 48 * 16)
  assert times["compile_s"] >= 0


def test_mfu_arithmetic():
  # 1e12 FLOPs in 0.5 s on a 4e12 FLOP/s device: 2e12 achieved, 50%.
  assert common.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)


def test_speedup_ceiling_is_the_ratio_at_the_best_matmul():
  # diffusers runs 1e12 FLOPs in 10 s (100 GFLOP/s); at the machine's best matmul (250 GFLOP/s,
  # PyTorch's here) the same FLOPs take 4 s, so no implementation exceeds 10 / 4 = 2.5x.
  peak = common.best_peak_flops({"peak_flops_per_s": 2.0e11}, None, {"peak_flops_per_s": 2.5e11})
  assert peak == 2.5e11
  assert common.speedup_ceiling(1e12 / 10.0, peak) == pytest.approx(10.0 / (1e12 / peak))
  assert common.speedup_ceiling(1e11, peak) == pytest.approx(2.5)


def test_torch_peak_is_two_n_cubed_over_the_fastest_matmul(monkeypatch):
  import torch  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_time_calls(call, *, warmup, iters):
    calls.append(call())  # the timed call: one [n, n] @ [n, n] product
    return {"min_s": 0.5, "median_s": 1.0}
  monkeypatch.setattr(common, "torch_time_calls", fake_time_calls)
  peak = common.measured_torch_peak_flops("float32", size=64, repeats=3)
  assert calls[0].shape == (64, 64) and calls[0].dtype == torch.float32
  assert peak["peak_flops_per_s"] == pytest.approx(2 * 64 ** 3 / 0.5)
  assert peak["median_flops_per_s"] == pytest.approx(2 * 64 ** 3 / 1.0)


def test_time_calls_and_table():
  timing = common.time_calls(lambda: jnp.ones(3) * 2, warmup=1, iters=3)
  assert timing["iters"] == 3 and timing["min_s"] <= timing["median_s"] <= timing["max_s"]
  table = common.format_table([{"a": 1.234, "b": None}], [("a", "A", ".1f"), ("b", "B", "")])
  assert table.splitlines()[-1] == "| 1.2 | - |"


@pytest.fixture
def benchmark_flags():
  """The benchmark flags parsed with their defaults (--max_load=1.5, --force=False)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  yield flags.FLAGS
  flags.FLAGS["force"].value = False
  flags.FLAGS["max_load"].value = 1.5


def test_a_loaded_timing_is_not_written_unless_forced(benchmark_flags, monkeypatch, tmp_path):
  monkeypatch.setattr(common.os, "getloadavg", lambda: (0.4, 0.5, 0.6))
  path = str(tmp_path / "result.json")
  # The end-of-section load (1.9) is the benchmark's own threads: it does not make a run loaded.
  quiet = {"machine": {"loadavg_start": [0.3, 0.2, 0.1]},
           "records": [{"timing": {"load_start": 0.3, "load_end": 1.9, "other_cpu": 0.1}}]}
  common.write_json(path, quiet)
  with open(path) as f:
    written = json.load(f)
  assert written["quiet"] is True and written["max_other_cpu"] == pytest.approx(0.1)
  loaded = {"machine": {"loadavg_start": [0.3, 0.2, 0.1]},
            "records": [{"timing": {"load_start": 0.3, "load_end": 1.2, "other_cpu": 0.1}},
                        {"torch": [{"load_start": 0.9, "load_end": 0.9, "other_cpu": 0.8}]}]}
  with pytest.raises(common.NotQuiet, match="0.80 cores.*--force"):
    common.write_json(path, loaded)
  with open(path) as f:
    assert json.load(f) == written  # the earlier quiet result is kept
  busy_start = {"machine": {"loadavg_start": [2.7, 1.0, 0.5]}, "records": quiet["records"]}
  with pytest.raises(common.NotQuiet, match="2.70 when the run started"):
    common.write_json(path, busy_start)
  benchmark_flags["force"].value = True
  common.write_json(path, loaded)
  with open(path) as f:
    forced = json.load(f)
  assert forced["quiet"] is False and forced["max_other_cpu"] == pytest.approx(0.8)


def test_load_meter_counts_only_other_processes(monkeypatch):
  """Over 10 s of wall time the machine was busy 17 CPU-seconds, 15 of them ours: others used
  0.2 cores."""
  clock = iter([100.0, 110.0])
  busy = iter([1000.0, 1017.0])
  own = iter([50.0, 65.0])
  loads = iter([(0.7, 0, 0), (1.9, 0, 0)])
  monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(common, "machine_busy_seconds", lambda: next(busy))
  monkeypatch.setattr(common.time, "process_time", lambda: next(own))
  monkeypatch.setattr(common.os, "getloadavg", lambda: next(loads))
  record = common.LoadMeter().record()
  assert record == {"load_start": 0.7, "load_end": 1.9, "other_cpu": pytest.approx(0.2)}


def test_own_cpu_counts_finished_child_processes():
  """A benchmark that runs commands (first_run/search.py) must not count them as other load."""
  before = common.own_cpu_seconds()
  subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                  "while time.process_time() - t < 0.5: pass"], check=True)
  assert common.own_cpu_seconds() - before >= 0.45


def test_machine_busy_seconds_grows_with_our_own_work():
  before, own_before = common.machine_busy_seconds(), common.time.process_time()
  total = 0
  while common.time.process_time() - own_before < 0.3:
    total += sum(range(10000))
  assert common.machine_busy_seconds() - before >= 0.25  # at least our own 0.3 s, up to a tick


_CPUINFO_TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 fma avx512bw
bogomips\t: 4890.86

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: another processor
flags\t\t: fpu avx512f
"""


def test_processor_is_read_from_the_first_cpuinfo_block():
  # avx512bw alone is not AVX-512 Foundation; the second block's avx512f must not leak in.
  assert common.processor(_CPUINFO_TWO_PROCESSORS) == (
      "AMD EPYC (AuthenticAMD, family 25 model 1), AVX-512: no")
  with_avx512 = _CPUINFO_TWO_PROCESSORS.replace("avx512bw", "avx512f avx512bw", 1)
  assert common.processor(with_avx512).endswith("AVX-512: yes")
  assert common.processor("processor\t: 0\nfeatures\t: fp asimd\n") is None  # no model name


def test_machine_info_records_this_processor():
  recorded = common.machine_info()["processor"]
  try:
    with open("/proc/cpuinfo") as f:
      first_block = f.read().split("\n\n")[0]
  except OSError:
    first_block = ""
  # This machine's own model name and AVX-512 Foundation flag, read here without the helper.
  name = re.search(r"^model name\s*:\s*(.*)$", first_block, re.MULTILINE)
  if name is None:
    assert recorded is None
    return
  assert recorded.startswith(name.group(1).strip() + " (")
  avx512 = re.search(r"^flags\s*:.*\bavx512f\b", first_block, re.MULTILINE) is not None
  assert recorded.endswith("AVX-512: " + ("yes" if avx512 else "no"))


def test_time_side_by_side_alternates_the_calls():
  order = []
  calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
  timings = common.time_side_by_side(calls, warmup=1, iters=3)
  assert order == ["a", "b"] * 4
  assert set(timings) == {"a", "b"}
  assert timings["a"]["iters"] == 3 and len(timings["b"]["times_s"]) == 3
  assert {"load_start", "load_end", "other_cpu"} <= set(timings["a"])


def test_time_calls_records_the_load_around_the_timed_calls(monkeypatch):
  loads = iter([(0.7, 0, 0), (1.9, 0, 0)])
  monkeypatch.setattr(common.os, "getloadavg", lambda: next(loads))
  timing = common.time_calls(lambda: jnp.ones(3), warmup=0, iters=2)
  assert (timing["load_start"], timing["load_end"]) == (0.7, 1.9)


def test_score_digits_refuses_missing_files_and_arrays(tmp_path):
  from experiments import score_digits  # pylint: disable=import-outside-toplevel
  script = os.path.join(os.path.dirname(__file__), "..", "experiments", "score_digits.py")
  missing = str(tmp_path / "samples_none.npz")
  result = subprocess.run([sys.executable, script, missing], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {missing} does not exist: pass the npz files written by python -m jaxdiff.sample"]
  wrong = str(tmp_path / "wrong.npz")
  np.savez(wrong, images=np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="no arr_0"):
    score_digits.score_file(None, wrong)


@pytest.mark.parametrize("machine, expected", [
    ({"platform": "cpu", "xla_flags": "--xla_cpu_experimental_ynn_fusion_type="
      "-individual_convolution,-individual_dot --xla_cpu_use_onednn=true "
      "--xla_cpu_experimental_onednn_fusion_type=individual_dot"}, "oneDNN"),
    ({"platform": "cpu", "xla_flags": "--xla_cpu_experimental_ynn_fusion_type="
      "-individual_convolution,-individual_dot"}, "XLA"),
    ({"platform": "cpu",
      "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}, "YNNPACK"),
    ({"platform": "cpu", "xla_flags": "--xla_cpu_use_onednn=false"}, "YNNPACK"),
    ({"platform": "cpu"}, "-"),  # results from before the flags were recorded
    ({"platform": "gpu", "xla_flags": ""}, "-")])
def test_report_names_the_matmul_library_from_the_recorded_xla_flags(machine, expected):
  from experiments import report  # pylint: disable=import-outside-toplevel
  assert report.matmul_library(machine) == expected
