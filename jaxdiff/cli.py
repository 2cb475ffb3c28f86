"""The one convention of every jaxdiff command (`python -m jaxdiff.train | sample | evaluate`).

- Success exits with status 0.
- Bad input (a flag, a config field, a file, a checkpoint that does not fit) is found before
  anything is written and reported as ONE line on stderr, `error: <what is wrong and the fix>`,
  with exit status 2 (`EXIT_ERROR`).
- `python -m jaxdiff.train` stopped by SIGTERM saves a checkpoint first and exits with 143.
- On a CPU-only glibc host, every command keeps freed memory in the process
  (`keep_host_memory`); `JAXDIFF_HOST_MALLOC=system` opts out.
- Every command compiles convolutions and matmuls with XLA:CPU's own kernels rather than
  YNNPACK's (`choose_xla_cpu_kernels`), unless XLA_FLAGS already chooses;
  `JAXDIFF_XLA_CPU_MATMULS=ynnpack` gives the matmuls back to YNNPACK and `onednn` opts in to
  oneDNN matmuls on x86-64.

The options of sample and evaluate are a frozen dataclass whose fields carry their help text:
`define_flags` derives the absl flags from it and `options_from_flags` turns the parsed flags back
into the dataclass, so every option is written once.
"""

import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import sys
import types
import typing
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags

EXIT_ERROR = 2
EXIT_PREEMPTED = 143


# XLA:CPU's library fusion kinds (DebugOptions.LibraryFusionType). "-" removes one from YNNPACK's
# default set (reduce, individual dot, individual convolution).
_YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_ONEDNN_FLAGS = ("xla_cpu_use_onednn", "xla_cpu_experimental_onednn_fusion_type")
_MATMULS_VARIABLE = "JAXDIFF_XLA_CPU_MATMULS"
_XLA_CPU_DOTS = f"--{_YNN_FUSION_FLAG}=-individual_convolution,-individual_dot"
# JAXDIFF_XLA_CPU_MATMULS -> the XLA flags it appends.
_DEFAULT_MATMULS = "xla"
_MATMUL_FLAGS = {
    "xla": (_XLA_CPU_DOTS,),
    "ynnpack": (f"--{_YNN_FUSION_FLAG}=-individual_convolution",),
    "onednn": (_XLA_CPU_DOTS, "--xla_cpu_use_onednn=true",
               "--xla_cpu_experimental_onednn_fusion_type=individual_dot"),
}

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class UsageError(ValueError):
  """Bad input to a command, reported as one `error:` line (exit status 2)."""


def one_line(text: Any) -> str:
  """`text` with every run of whitespace (newlines too) collapsed to one space."""
  return " ".join(str(text).split())


def fail(message: Any, status: int = EXIT_ERROR) -> NoReturn:
  """Prints `error: message` as one line on stderr and exits with `status`."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str], validate: Callable[[], Any] | None = None) -> list[str]:
  """absl flag parsing that reports a bad flag, config file or config override on one line.

  `validate`, if given, runs after parsing (e.g. loading a lazily read config file) and its
  errors are reported the same way. Runs `prepare_process` first: every command parses its
  flags before JAX starts.
  """
  prepare_process()
  try:
    remaining = flags.FLAGS(argv)
    if validate is not None:
      validate()
    return remaining
  except Exception as error:  # pylint: disable=broad-exception-caught
    # absl raises flags.Error; config_flags also KeyError/AttributeError/ValueError for a bad
    # override or config file.
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    lines = text.strip().splitlines()
    if any(line.startswith("Traceback") for line in lines):  # an error inside the config file
      text = f"{lines[0].split(': Error whilst')[0]}: {lines[-1].strip()}"
    fail(f"bad flag: {one_line(text) or repr(error)}")


def prepare_process() -> bool:
  """The process settings of every command, applied before JAX starts: `keep_host_memory` and
  `choose_xla_cpu_kernels`. Returns whether host memory is kept."""
  kept = keep_host_memory()
  choose_xla_cpu_kernels()
  return kept


def keep_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of returning it to the kernel.

  XLA:CPU allocates each executable's temporary buffers on every call and frees them after. With
  glibc's defaults, a buffer over 32 MiB, or one freed in an XLA worker thread's arena, goes back
  to the kernel, so every call faults its pages in again: DiT-S/2's train step at batch 16 took
  about 690,000 page faults and 2.5-3 s of kernel time per 7-8 s step, the offline default's
  U-Net step about 20,000 faults and 50 ms of kernel time per 160 ms. One arena, no mmap'd chunks
  and no trimming at all (a threshold of 2 GiB still returned DiT-S/2's buffers) bring that to
  under 100 faults per step (experiments/README.md has the figures). The heap then stays at its
  peak size. Must run before JAX starts its threads; later calls change nothing for threads that
  already have an arena.

  Only on a CPU-only Linux glibc host (no JAX accelerator plugin installed, or JAX_PLATFORMS=cpu)
  and unless JAXDIFF_HOST_MALLOC=system. Returns whether the setting was applied.
  """
  if (os.environ.get("JAXDIFF_HOST_MALLOC", "keep") == "system" or sys.platform != "linux"
      or platform.libc_ver()[0] != "glibc" or _accelerator_possible()):
    return False
  libc = ctypes.CDLL("libc.so.6")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings])


def choose_xla_cpu_kernels(machine: str | None = None) -> bool:
  """Chooses the libraries XLA:CPU compiles convolutions and matmuls with.

  jax 0.10's XLA:CPU hands every convolution and every matmul to YNNPACK by default. Measured side
  by side in one process on 2-core machines (experiments/README.md, findings 9, 12 and 13):
  - convolutions with XLA's own (Eigen) kernels ran the DDPM CIFAR-10 U-Net 1.16x faster forward
    (batch 4) and 1.57x faster forward and backward (batch 16) on a Xeon. Every command uses them.
  - matmuls with XLA's own kernels too (`JAXDIFF_XLA_CPU_MATMULS=xla`, the default) ran the
    DiT-S/2 train step 1.09-1.10x faster than YNNPACK's at batch 16 and 32 on an AMD EPYC (Zen 4),
    left the DDPM U-Net's step as it was, and made the offline default's 0.28M-parameter U-Net
    slower (its matmuls are small; 500 steps in 72-82 s against 67-70 s). `ynnpack` gives the
    matmuls back to YNNPACK.
  - matmuls with oneDNN (`onednn`, x86-64 only; Intel's library, linked into jaxlib but off by
    default) ran the DiT-S/2 step about 1.15x faster than YNNPACK's on a Xeon. They are opt-in:
    XLA marks the oneDNN fusions experimental, and the one CI run with them on by default lost a
    pytest worker to a crash that six full runs of the suite here did not reproduce (finding 12).
  YNNPACK keeps the reductions in every setting.

  Appends `_MATMUL_FLAGS[JAXDIFF_XLA_CPU_MATMULS or _DEFAULT_MATMULS]` to XLA_FLAGS, unless XLA_FLAGS
  already sets one of those fields. XLA reads XLA_FLAGS once, when JAX's backend starts, so this
  must run before the first computation. Only CPU compilations read these flags.

  jaxlib 0.10 cannot serialise an executable with oneDNN fusions ("ToProto is not implemented
  for thunk kind: onednn-fusion"), so where oneDNN cannot be used (not x86-64, or JAX's
  persistent compilation cache configured through JAX_COMPILATION_CACHE_DIR) `onednn` falls back
  to the default.

  A JAXDIFF_XLA_CPU_MATMULS not in `_MATMUL_FLAGS` exits with `fail`'s one line.

  Args:
    machine: the processor architecture; None reads it from `platform.machine()`.

  Returns:
    Whether it appended the flags.
  """
  matmuls = os.environ.get(_MATMULS_VARIABLE, _DEFAULT_MATMULS)
  if matmuls not in _MATMUL_FLAGS:
    fail(f"{_MATMULS_VARIABLE}={matmuls!r} is not a matmul library XLA:CPU can use: set it to "
         f"{', '.join(_MATMUL_FLAGS)} ({_DEFAULT_MATMULS}, the default), or unset it")
  current = os.environ.get("XLA_FLAGS", "")
  if any(field in current for field in (_YNN_FUSION_FLAG, *_ONEDNN_FLAGS)):
    return False
  if matmuls == "onednn" and (not is_x86_64(machine)
                              or os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    matmuls = _DEFAULT_MATMULS
  os.environ["XLA_FLAGS"] = " ".join([current, *_MATMUL_FLAGS[matmuls]]).strip()
  return True


def is_x86_64(machine: str | None = None) -> bool:
  """Whether `machine` (default: this host's `platform.machine()`) is x86-64, where jaxlib is
  built with oneDNN."""
  machine = platform.machine() if machine is None else machine
  return machine.lower() in ("x86_64", "amd64")


def use_cpu_devices(count: int) -> bool:
  """On a CPU-only process, makes JAX see the host's cores as `count` devices (data parallel).

  XLA:CPU parallelises each op over the cores; a small model's ops are too small for that to pay
  (the offline default's U-Net step ran 1.4-2x faster as two devices with half the batch each
  than as one device on both cores), while a large model's GEMMs are not (DiT-S/2 ran 2.7x
  slower).
  Does nothing for `count` <= 1, where an accelerator may be used, where XLA_FLAGS already sets
  a host device count, or once JAX's backend has started (the count is fixed then). Returns
  whether it applied.
  """
  if (count <= 1 or _accelerator_possible()
      or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backend has started
    return False
  return True


def _accelerator_possible() -> bool:
  """Whether JAX may run on an accelerator here: JAX_PLATFORMS names one, or (unset) a PJRT
  plugin or libtpu is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return any(name.strip() != "cpu" for name in platforms.split(","))
  return (bool(importlib.metadata.entry_points(group="jax_plugins"))
          or importlib.util.find_spec("libtpu") is not None)


def _flag_kind(annotation: Any) -> tuple[Any, bool]:
  """(the non-None type of a field annotation, whether None is allowed)."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0], True
  return annotation, False


def _option_fields(options_cls: type) -> list[dataclasses.Field]:
  """The dataclass's fields, with nested dataclass fields flattened in their place."""
  fields = []
  for field in dataclasses.fields(options_cls):
    if dataclasses.is_dataclass(field.type):
      fields += _option_fields(field.type)
    else:
      fields.append(field)
  return fields


def define_flags(options_cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of `options_cls` (nested dataclasses flattened).

  Field types: str, int, float, bool, `X | None` (default None) and tuple[int, ...] or
  tuple[float, ...] (given comma-separated). The help text is the field's `metadata["help"]`.
  """
  definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              bool: flags.DEFINE_bool}
  for field in _option_fields(options_cls):
    kind, _ = _flag_kind(field.type)
    help_text = field.metadata.get("help", field.name)
    if typing.get_origin(kind) is tuple:
      flags.DEFINE_string(field.name, ",".join(map(str, field.default)), help_text,
                          flag_values=flag_values)
    else:
      definers[kind](field.name, field.default, help_text, flag_values=flag_values)


def parse_tuple(name: str, text: str, element: type = int) -> tuple:
  """'3, 5,7' -> (3, 5, 7) of `element`s; '' -> (); anything else is a UsageError naming --name."""
  try:
    return tuple(element(part) for part in text.split(",") if part.strip())
  except ValueError:
    kind = "integers" if element is int else "numbers"
    raise UsageError(f"--{name}={text!r} must be comma-separated {kind}") from None


def options_from_flags(options_cls: type, flag_values: flags.FlagValues = flags.FLAGS):
  """The dataclass `options_cls` from the parsed flags of `define_flags`."""
  values = {}
  for field in dataclasses.fields(options_cls):
    if dataclasses.is_dataclass(field.type):
      values[field.name] = options_from_flags(field.type, flag_values)
      continue
    value = flag_values[field.name].value
    kind = _flag_kind(field.type)[0]
    if typing.get_origin(kind) is tuple:
      value = parse_tuple(field.name, value, typing.get_args(kind)[0])
    values[field.name] = value
  return options_cls(**values)


def call(run: Callable[[Any], Any], options: Any, errors: tuple[type[Exception], ...]) -> Any:
  """`run(options)`, with the `errors` reported by `fail` (one line, exit status 2)."""
  try:
    return run(options)
  except errors as error:
    fail(error)


def main(options_cls: type, run: Callable[[Any], Any],
         errors: tuple[type[Exception], ...]) -> None:
  """Runs a command: flags from `options_cls`, then `run(options)` under the convention."""
  define_flags(options_cls)

  def program(argv: list[str]) -> None:
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]}")
    try:
      options = options_from_flags(options_cls)
    except UsageError as error:
      fail(error)
    call(run, options, errors)

  app.run(program, flags_parser=parse_flags)
