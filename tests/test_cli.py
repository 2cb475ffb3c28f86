"""jaxdiff.cli: the one convention of every command, and options derived from a dataclass."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from jaxdiff import cli


@dataclasses.dataclass(frozen=True)
class Inner:
  method: str = dataclasses.field(default="ddim", metadata={"help": "Sampler."})
  scale: float | None = dataclasses.field(default=None, metadata={"help": "A scale."})


@dataclasses.dataclass(frozen=True)
class Options:
  path: str | None = dataclasses.field(default=None, metadata={"help": "A path."})
  count: int = dataclasses.field(default=3, metadata={"help": "How many."})
  flag: bool = dataclasses.field(default=True, metadata={"help": "On or off."})
  labels: tuple[int, ...] = dataclasses.field(default=(), metadata={"help": "Labels."})
  inner: Inner = Inner()


def _parse(argv):
  values = flags.FlagValues()
  cli.define_flags(Options, values)
  values(["prog", *argv])
  return values, cli.options_from_flags(Options, values)


def test_flags_come_from_the_dataclass_and_parse_back():
  values, defaults = _parse([])
  assert defaults == Options()
  assert values["count"].help == "How many." and values["method"].help == "Sampler."
  _, options = _parse(["--path=x", "--count=7", "--noflag", "--labels=3, 5,7", "--method=ddpm",
                       "--scale=1.5"])
  assert options == Options(path="x", count=7, flag=False, labels=(3, 5, 7),
                            inner=Inner(method="ddpm", scale=1.5))


def test_parse_tuple():
  assert cli.parse_tuple("labels", " 3, 5,7") == (3, 5, 7)
  assert cli.parse_tuple("labels", "") == ()
  assert cli.parse_tuple("interval", "0.5,2", float) == (0.5, 2.0)
  with pytest.raises(cli.UsageError, match="--labels='a,b' must be comma-separated integers"):
    cli.parse_tuple("labels", "a,b")
  with pytest.raises(cli.UsageError, match="--interval='x' must be comma-separated numbers"):
    cli.parse_tuple("interval", "x", float)


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.fail("two\nlines   here")
  assert exit_info.value.code == cli.EXIT_ERROR == 2
  assert capsys.readouterr().err == "error: two lines here\n"


def test_call_reports_only_the_listed_errors(capsys):
  def run(options):
    if options == "bad":
      raise FileNotFoundError("no such file: x.npz")
    if options == "bug":
      raise KeyError("a bug is a traceback, not a one-line error")
    return options
  assert cli.call(run, "ok", (FileNotFoundError,)) == "ok"
  with pytest.raises(SystemExit) as exit_info:
    cli.call(run, "bad", (FileNotFoundError,))
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: no such file: x.npz\n"
  with pytest.raises(KeyError):
    cli.call(run, "bug", (FileNotFoundError,))


_FAULTS_PER_CALL = """
import resource, sys
from jaxdiff import cli
applied = cli.keep_host_memory()
import jax, jax.numpy as jnp
make = jax.jit(lambda x: jnp.sin(x) + x)  # a fresh 64 MiB result on every call
x = jnp.ones((16 * 2**20,), jnp.float32)
for _ in range(10):  # the heap grows over the first few calls, while frees are asynchronous
  make(x).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  make(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[4])  # the median call
"""


def _run_python(script: str, *args: str, **env: str | None) -> subprocess.CompletedProcess:
  """Runs `script` in a fresh CPU-only Python whose environment is this one's with `env` applied
  (None unsets a variable), so its JAX starts with the settings under test."""
  environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for name, value in env.items():
    if value is None:
      environment.pop(name, None)
    else:
      environment[name] = value
  return subprocess.run([sys.executable, "-c", script, *args], env=environment,
                        capture_output=True, text=True, timeout=120, check=True)


def _faults_per_call(**env_overrides):
  out = _run_python(_FAULTS_PER_CALL, **env_overrides).stdout.split()
  return out[0] == "True", float(out[1])


def test_keep_host_memory_stops_page_faults_per_call():
  # A 64 MiB buffer is 16,384 pages of 4 KiB: glibc's default maps it fresh on every call (one
  # fault per page touched); kept memory is reused without faulting.
  kept, kept_faults = _faults_per_call()
  system, system_faults = _faults_per_call(JAXDIFF_HOST_MALLOC="system")
  assert kept and not system
  assert system_faults > 10_000, system_faults
  assert kept_faults < 500, kept_faults


def test_keep_host_memory_only_when_jax_runs_on_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert cli._accelerator_possible() and not cli.keep_host_memory()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not cli._accelerator_possible()
  monkeypatch.setenv("JAXDIFF_HOST_MALLOC", "system")
  assert not cli.keep_host_memory()


_XLA_DOTS = ["--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"]
_YNNPACK_DOTS = ["--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
_ONEDNN = [*_XLA_DOTS, "--xla_cpu_use_onednn=true",
           "--xla_cpu_experimental_onednn_fusion_type=individual_dot"]


@pytest.mark.parametrize("machine, matmuls, appended", [
    ("x86_64", None, _XLA_DOTS), ("aarch64", None, _XLA_DOTS), ("x86_64", "xla", _XLA_DOTS),
    ("x86_64", "ynnpack", _YNNPACK_DOTS), ("x86_64", "onednn", _ONEDNN),
    ("AMD64", "onednn", _ONEDNN), ("aarch64", "onednn", _XLA_DOTS)])
def test_choose_xla_cpu_kernels_appends_its_flags_once_and_keeps_a_users_choice(
    monkeypatch, machine, matmuls, appended):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  if matmuls is None:
    monkeypatch.delenv("JAXDIFF_XLA_CPU_MATMULS", raising=False)
  else:
    monkeypatch.setenv("JAXDIFF_XLA_CPU_MATMULS", matmuls)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert cli.choose_xla_cpu_kernels(machine)
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                             *appended]
  assert not cli.choose_xla_cpu_kernels(machine)  # already there: unchanged
  for users_choice in ("--xla_cpu_experimental_ynn_fusion_type=",
                       "--xla_cpu_use_onednn=false",
                       "--xla_cpu_experimental_onednn_fusion_type=dot"):
    monkeypatch.setenv("XLA_FLAGS", users_choice)
    assert not cli.choose_xla_cpu_kernels(machine)
    assert os.environ["XLA_FLAGS"] == users_choice


def test_choose_xla_cpu_kernels_keeps_the_default_matmuls_for_a_persistent_compilation_cache(
    monkeypatch):
  monkeypatch.setenv("JAXDIFF_XLA_CPU_MATMULS", "onednn")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/jax_cache")
  monkeypatch.setenv("XLA_FLAGS", "")
  assert cli.choose_xla_cpu_kernels("x86_64")
  assert os.environ["XLA_FLAGS"].split() == _XLA_DOTS


def test_choose_xla_cpu_kernels_names_a_bad_matmul_library_in_one_line(monkeypatch, capsys):
  monkeypatch.setenv("JAXDIFF_XLA_CPU_MATMULS", "mkl")
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(SystemExit) as exit_info:
    cli.choose_xla_cpu_kernels("x86_64")
  assert exit_info.value.code == cli.EXIT_ERROR
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "JAXDIFF_XLA_CPU_MATMULS='mkl'" in err
  assert all(name in err for name in ("xla", "ynnpack", "onednn"))
  assert os.environ["XLA_FLAGS"] == ""


_SERIALISE = """
import sys
from jaxdiff import cli
cli.choose_xla_cpu_kernels()
import jax, jax.numpy as jnp
from jax.experimental import serialize_executable
compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile()
try:
  serialize_executable.serialize(compiled)
  print("serialised")
except Exception as error:  # jaxlib's error for an executable it cannot write
  print("not serialised:", str(error).splitlines()[0])
"""


@pytest.mark.skipif(not cli.is_x86_64(), reason="oneDNN dots are chosen on x86-64 only")
@pytest.mark.parametrize("cache_dir, expected", [("", "not serialised"), ("set", "serialised")])
def test_executables_serialise_for_the_compilation_cache_only_without_onednn(
    tmp_path, cache_dir, expected):
  # Why choose_xla_cpu_kernels falls back to the default matmuls when the persistent cache is
  # set: a oneDNN fusion cannot be written (if a jaxlib learns to, this test says so).
  result = _run_python(_SERIALISE, XLA_FLAGS="", JAXDIFF_XLA_CPU_MATMULS="onednn",
                       JAX_COMPILATION_CACHE_DIR=str(tmp_path) if cache_dir else "")
  assert result.stdout.strip().split(":")[0] == expected, result.stdout + result.stderr[-2000:]


_FUSIONS = """
import json, re
from jaxdiff import cli
cli.choose_xla_cpu_kernels()
import jax, jax.numpy as jnp
programs = {
    "convolution": (lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        (jnp.ones((4, 32, 32, 64)), jnp.ones((3, 3, 64, 64)))),
    "matmul": (lambda a, b: a @ b, (jnp.ones((256, 256)), jnp.ones((256, 256)))),
    "batched matmul": (lambda a, b: jnp.einsum("bts,bsd->btd", a, b),
                       (jnp.ones((8, 64, 32)), jnp.ones((8, 32, 16)))),
    "reduction": (lambda a: jnp.sum(a, axis=0), (jnp.ones((512, 256)),)),
}
kinds = {}
for name, (fn, args) in programs.items():
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  found = sorted(set(re.findall(r'"__(ynn|onednn)_fusion"', hlo)))
  kinds[name] = found or (["xla"] if re.search(r" (convolution|dot)[(]", hlo) else ["none"])
print(json.dumps(kinds))
"""


@pytest.mark.parametrize("matmuls, matmul_kind", [
    (None, "xla"), ("ynnpack", "ynn"),
    pytest.param("onednn", "onednn", marks=pytest.mark.skipif(
        not cli.is_x86_64(), reason="oneDNN matmuls are chosen on x86-64 only"))])
def test_compiled_programs_use_xla_convolutions_and_the_chosen_matmul_library(
    matmuls, matmul_kind):
  # Without choose_xla_cpu_kernels (jax's default), all four would be YNNPACK fusions.
  result = _run_python(_FUSIONS, XLA_FLAGS="", JAXDIFF_XLA_CPU_MATMULS=matmuls,
                       JAX_COMPILATION_CACHE_DIR=None)
  assert json.loads(result.stdout) == {
      "convolution": ["xla"], "matmul": [matmul_kind], "batched matmul": [matmul_kind],
      "reduction": ["ynn"]}, result.stderr[-2000:]


_DEVICES_SEEN = """
import sys
from jaxdiff import cli
applied = cli.use_cpu_devices(int(sys.argv[1]))
import jax
print(applied, jax.device_count(), cli.use_cpu_devices(3))
"""


@pytest.mark.parametrize("count, xla_flags, expected", [
    (2, "", "True 2 False"),  # the second call comes after the backend started
    (0, "", "False 1 False"),
    (2, "--xla_force_host_platform_device_count=3", "False 3 False"),  # the user's flag wins
])
def test_use_cpu_devices_splits_the_host_before_jax_starts(count, xla_flags, expected):
  out = _run_python(_DEVICES_SEEN, str(count), XLA_FLAGS=xla_flags).stdout.strip()
  assert out == expected
