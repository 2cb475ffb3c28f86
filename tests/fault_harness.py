"""Fault injection around the real training CLI: SIGKILL at chosen or random moments, then rerun.

Shared by tests/test_faults.py and experiments/faults.py. Every run is `python -c RUNNER` in a
subprocess: the real `jaxdiff.train` main, with at most one fault armed through the
JAXDIFF_FAULT environment variable (read only by RUNNER, never by jaxdiff itself):

  compile:DELAY        SIGKILL DELAY seconds after the step's compilation starts
  step:N:DELAY         SIGKILL DELAY seconds after the batches of dispatch N are requested
  save:STEP:DELAY      SIGKILL DELAY seconds after the (asynchronous) save of STEP started
  finalize:STEP        SIGKILL in the background save of STEP, its files written but not renamed
  enospc:STEP          the save of STEP fails with ENOSPC while writing its files

A trial kills one run, reruns the same command until it exits 0, and compares the final
checkpoint (params, EMA, optimizer state, data position) with an uninterrupted run's, bit for bit.
"""

import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = r"""
import errno, os, signal, sys, threading, time
from absl import app
from jaxdiff.train import __main__ as cli
from jaxdiff.train import checkpoint, loop

def kill_after(delay):
  if delay <= 0:
    os.kill(os.getpid(), signal.SIGKILL)
  threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()

kind, *args = (os.environ.get("JAXDIFF_FAULT") or "none").split(":")
if kind == "compile":
  original_compile = loop._compile
  def _compile(*a, **k):
    kill_after(float(args[0]))
    return original_compile(*a, **k)
  loop._compile = _compile
elif kind == "step":
  original_next, calls = loop.next_batches, [0]
  def next_batches(*a, **k):
    calls[0] += 1
    if calls[0] == int(args[0]):
      kill_after(float(args[1]))
    return original_next(*a, **k)
  loop.next_batches = next_batches
elif kind == "save":
  original_save = checkpoint.save
  def save(manager, step, *a, **k):
    started = original_save(manager, step, *a, **k)
    if step == int(args[0]):
      kill_after(float(args[1]))
      time.sleep(3600)
    return started
  checkpoint.save = save
elif kind == "finalize":  # every file of the step written, its temporary not yet renamed
  from orbax.checkpoint._src.path import atomicity
  original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *a, **k):
    if self._final_path.name == args[0]:
      os.kill(os.getpid(), signal.SIGKILL)
    return await original_finalize(self, *a, **k)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif kind == "enospc":  # the background write of one item fails, as on a full disk
  import orbax.checkpoint as ocp
  class FullDisk:
    def __init__(self, path):
      self.path = path
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
  handler = ocp.JsonCheckpointHandler
  original_async = handler.async_save
  async def async_save(self, directory, *a, **k):
    futures = await original_async(self, directory, *a, **k)
    if f"/{args[0]}.orbax-checkpoint-tmp" in str(directory):
      return [*(futures or []), FullDisk(str(directory))]
    return futures
  handler.async_save = async_save
app.run(cli.main, argv=["jaxdiff.train", *sys.argv[1:]], flags_parser=cli.parse_flags)
"""

# The offline default shrunk: unet-tiny on 8x8 digits, a checkpoint every 2 steps (async).
TINY_RUN = ["--config=configs/mnist_offline.py:tiny", "--config.data.image_size=8",
            "--config.train.num_steps=8", "--config.train.sample_every=0",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.max_to_keep=3",
            "--config.checkpoint.async_save=True", "--config.train.log_every=2"]


def env(fault: str | None = None, cache_dir: str | None = None) -> dict[str, str]:
  """Subprocess environment: 1 CPU device, LLVM optimisation off (fast compiles) and, given
  `cache_dir`, JAX's persistent compilation cache (a rerun loads the same executable)."""
  out = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0"}
  out.pop("JAXDIFF_FAULT", None)
  if fault:
    out["JAXDIFF_FAULT"] = fault
  if cache_dir:
    out.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return out


def command(workdir: str, extra=()) -> list[str]:
  return [sys.executable, "-c", RUNNER, *TINY_RUN, *extra, f"--workdir={workdir}"]


def run(workdir: str, extra=(), fault: str | None = None, kill_at: float | None = None,
        cache_dir: str | None = None, timeout: float = 900) -> tuple[int, str, float]:
  """Runs the CLI once; SIGKILLs it from outside `kill_at` seconds after the start if given.

  Returns:
    (exit status, stderr, seconds).
  """
  begin = time.perf_counter()
  process = subprocess.Popen(command(workdir, extra), cwd=REPO, env=env(fault, cache_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _, stderr = process.communicate(timeout=kill_at if kill_at is not None else timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    _, stderr = process.communicate()
    if kill_at is None:
      raise
  return process.returncode, stderr, time.perf_counter() - begin


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def leftovers(workdir: str) -> list[str]:
  """Entries of checkpoints/ that are not finished steps (Orbax temporaries, partial dirs)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(root) if not n.isdigit()) if os.path.isdir(root) else []


@dataclasses.dataclass
class Trial:
  """One fault and its recovery."""
  fault: str
  killed_status: int
  steps_saved_at_kill: list[int]
  leftovers_at_kill: list[str]
  resume_status: int
  resume_seconds: float
  resume_stderr: str
  steps_lost: int  # steps trained before the kill that the rerun had to train again
  final_digest: str = ""


def final_digest(workdir: str, step: int = 8) -> str:
  """sha256 of the final checkpoint's params, EMA, optimizer state, step and data position."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import checkpoint  # pylint: disable=g-import-not-at-top
  config, _, _, _ = checkpoint.restore_for_inference(workdir, step)
  manager = checkpoint.open_manager(workdir, read_only=True)
  try:
    saved = checkpoint.read_config(manager, step)
    from jaxdiff.data import DatasetInfo  # pylint: disable=g-import-not-at-top
    from jaxdiff.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    replicated = sharding_lib.replicated(sharding_lib.make_mesh(1))
    from jaxdiff.train import state as state_lib  # pylint: disable=g-import-not-at-top
    info = DatasetInfo(**saved["dataset"])
    model = state_lib.make_model(config, info)
    tx, _ = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
    shapes = state_lib.abstract_state(model, tx, config, info)
    shapes = sharding_lib.with_shardings(shapes, jax.tree.map(lambda _: replicated, shapes))
    state, data = checkpoint.restore(manager, step, shapes, None)
  finally:
    manager.close()
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(jax.tree_util.keystr(path).encode() + array.tobytes())
  digest.update(repr(sorted(data.items())).encode())
  return digest.hexdigest()


def steps_trained(workdir: str) -> int:
  """Highest step logged in WORKDIR/metrics.jsonl (steps are logged every 2)."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return max([json.loads(line)["step"] for line in f if line.strip()] or [0])


def kill_trial(workdir: str, fault: str | None = None, kill_at: float | None = None,
               extra=(), cache_dir: str | None = None) -> Trial:
  """Kills one run (by `fault` or from outside at `kill_at` s), then reruns it to the end."""
  status, _, _ = run(workdir, extra, fault=fault, kill_at=kill_at, cache_dir=cache_dir)
  trained = steps_trained(workdir)
  saved = checkpoint_steps(workdir)
  left = leftovers(workdir)
  status_resume, stderr, seconds = run(workdir, extra, cache_dir=cache_dir)
  return Trial(fault=fault or f"external SIGKILL at {kill_at:.1f}s", killed_status=status,
               steps_saved_at_kill=saved, leftovers_at_kill=left, resume_status=status_resume,
               resume_seconds=seconds, resume_stderr=stderr[-2000:],
               steps_lost=max(0, trained - max(saved or [0])))


def random_faults(count: int, seed: int, run_seconds: float) -> list[tuple[str | None, float | None]]:
  """A reproducible mix: kills in compile, mid-step, in async saves, and at random times."""
  rng = random.Random(seed)
  fixed = [("compile:0.3", None), ("step:3:0.01", None), ("save:2:0", None),
           ("finalize:4", None), ("save:4:0.02", None), ("save:6:0.005", None)]
  out = list(fixed[:count])
  while len(out) < count:
    out.append((None, rng.uniform(0.2, 1.0) * run_seconds))
  return out


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(workdir: str, extra=(), heartbeat: int = 10, cache_dir: str | None = None,
               log_dir: str | None = None) -> list[subprocess.Popen]:
  """The same run as two processes on 127.0.0.1 (jax.distributed + gloo), stderr to files."""
  port = free_port()
  args = [*extra, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--heartbeat_timeout_seconds={heartbeat}"]
  log_dir = log_dir or workdir + "_logs"
  os.makedirs(log_dir, exist_ok=True)
  processes = []
  for i in range(2):
    log = os.path.join(log_dir, f"stderr_{i}_{time.time_ns()}")
    with open(log, "w", encoding="utf-8") as stderr:
      process = subprocess.Popen([*command(workdir, args), f"--process_id={i}"], cwd=REPO,
                                 env=env(cache_dir=cache_dir), stdout=subprocess.DEVNULL,
                                 stderr=stderr)
    process.log = log
    processes.append(process)
  return processes


def dead_peer_trial(workdir: str, extra=(), heartbeat: int = 10, victim: int = 1,
                    cache_dir: str | None = None, timeout: float = 600) -> dict:
  """Kills process `victim` once the pair saved its first checkpoint; times the survivor's exit,
  then restarts both and lets them finish.

  Returns:
    {"survivor_status", "survivor_seconds" (from the kill to its exit), "survivor_stderr",
     "restart_statuses", "steps_at_kill", "final_steps"}.
  """
  processes = start_pair(workdir, extra, heartbeat, cache_dir)
  begin = time.perf_counter()
  while not checkpoint_steps(workdir) and time.perf_counter() - begin < timeout:
    if any(p.poll() is not None for p in processes):
      break
    time.sleep(0.1)
  steps_at_kill = checkpoint_steps(workdir)
  processes[victim].kill()
  killed_at = time.perf_counter()
  survivor = processes[1 - victim]
  try:
    survivor.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    survivor.kill()
    survivor.wait()
  survivor_seconds = time.perf_counter() - killed_at
  processes[victim].wait()
  with open(survivor.log, encoding="utf-8", errors="replace") as f:
    survivor_stderr = f.read()
  restarted = start_pair(workdir, extra, heartbeat, cache_dir)
  for p in restarted:
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  return {"survivor_status": survivor.returncode, "survivor_seconds": survivor_seconds,
          "survivor_stderr": survivor_stderr, "restart_statuses": [p.returncode for p in restarted],
          "steps_at_kill": steps_at_kill, "final_steps": checkpoint_steps(workdir)}


def try_mount_tmpfs(path: str, size: str) -> bool:
  """Mounts a size-limited tmpfs at `path` (needs root); False where that is not permitted."""
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True, check=False)
  return result.returncode == 0


def resize_tmpfs(path: str, size: str) -> None:
  subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True, capture_output=True)


def unmount(path: str) -> None:
  subprocess.run(["umount", path], check=False, capture_output=True)
