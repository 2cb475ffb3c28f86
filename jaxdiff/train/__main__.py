"""Trains a diffusion model: `python -m jaxdiff.train --config=configs/X.py --workdir=DIR`.

Overrides: `--config.train.batch_size=64` (an unknown key is an error); variants after a colon:
`--config=configs/cifar_dit.py:tiny`. Re-running the same command resumes from the latest
checkpoint in DIR.

Several hosts (TPU VM pods, GPU clusters): start the same command on every host with either
  --distributed                        (auto-detection: TPU pods, SLURM, Open MPI, or the
                                        JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID
                                        environment variables), or
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   (explicit).
On CPU, processes communicate through gloo.

Exit status (the convention of every jaxdiff command, `jaxdiff.cli`): 0 done; 2 a problem that
was reported on one line (`error: ...`: bad config or flag, missing dataset, unreadable record,
unusable checkpoint, failed save, NaN loss) and left the workdir's finished checkpoints
untouched; 143 stopped by SIGTERM after saving a checkpoint (run again to resume). A killed run
resumes from its last finished checkpoint. When a peer process dies, the others abort (JAX:
"another task died") within --heartbeat_timeout_seconds.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxdiff import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar_dit.py or configs/cifar_dit.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for an explicit multi-process launch.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "Several processes: a peer silent this long is dead, and "
    "every process exits (JAX: 'another task died') instead of waiting in a collective.")

def _fail_now(message: str) -> None:
  """`cli.fail` without interpreter teardown: after a failed save, TensorStore may still be
  finishing the step's abandoned writes, which the exit need not wait for."""
  print(f"error: {cli.one_line(message)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(cli.EXIT_ERROR)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """`cli.parse_flags`, plus loading the config file (which config_flags defers to first use)."""
  return cli.parse_flags(argv, validate=lambda: _CONFIG.value and _CONFIG.value.get("seed"))


def initialize_distributed() -> None:
  """Joins the other processes when launched on several hosts (see the module docstring)."""
  explicit = _COORDINATOR.value is not None
  if not (explicit or _DISTRIBUTED.value or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; use --config=FILE --workdir=DIR")
  if _CONFIG.value is None:
    cli.fail("--config is required, e.g. --config=configs/mnist_offline.py")
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/mnist")
  if not flags.FLAGS["verbosity"].present:
    # Library logs (orbax logs every save, TFDS warns about metadata, orbax logs the file behind
    # a failed restore) would bury the progress bar and our one-line errors; --verbosity=-1 (or 0)
    # shows them again.
    logging.set_verbosity(logging.FATAL)
  initialize_distributed()
  # Imported here so that flag errors are reported without importing JAX.
  from jaxdiff.config import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import BadRecordError, DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  from jaxdiff.eval import ReferenceFileError, WeightsError  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  try:
    cli.call(_train, _WORKDIR.value,
             (ConfigError, DatasetNotFoundError, BadRecordError, checkpoint.CheckpointError,
              loop.TrainingError, ReferenceFileError, WeightsError))
  except loop.Preempted as preempted:
    print(f"jaxdiff.train: {preempted}", file=sys.stderr, flush=True)
    sys.exit(cli.EXIT_PREEMPTED)


def _train(workdir: str):
  from jaxdiff.train import checkpoint, loop  # pylint: disable=g-import-not-at-top
  cli.use_cpu_devices(_CONFIG.value.mesh.cpu_devices)
  try:
    return loop.train(_CONFIG.value, workdir)
  except checkpoint.SaveError as error:
    _fail_now(str(error))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
