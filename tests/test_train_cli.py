"""End-to-end: `python -m jaxdiff.train` in a subprocess, on mocked TFDS data and on the offline
MNIST sample, and its one-line refusals of bad input (which must leave the workdir untouched).

Subprocesses compile with LLVM optimisation off (--xla_backend_optimization_level=0): same
programs, a fraction of the compile time on a small CPU.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the real CLI main inside tfds.testing.mock_data (random cifar10-shaped examples).
MOCKED_TFDS = """
import sys
import tensorflow_datasets as tfds
from absl import app
from jaxdiff import cli
from jaxdiff.train import __main__ as train_main
with tfds.testing.mock_data(num_examples=32):
  app.run(train_main.main, argv=["jaxdiff.train", *sys.argv[1:]], flags_parser=cli.parse_flags)
"""


def env(devices: int | None = 1) -> dict[str, str]:
  """The subprocess environment; devices=None leaves the CPU device count to the command."""
  count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": "/nonexistent/tfds",
          "XLA_FLAGS": f"{count}--xla_backend_optimization_level=0"}


def start(args, devices=1, mocked=False) -> subprocess.Popen:
  prefix = ["-c", MOCKED_TFDS] if mocked else ["-m", "jaxdiff.train"]
  return subprocess.Popen([sys.executable, *prefix, *args], cwd=REPO, env=env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout=400) -> tuple[int, str]:
  _, stderr = process.communicate(timeout=timeout)
  return process.returncode, stderr


SMALL_RUN = ["--config.data.image_size=8", "--config.train.num_steps=2",
             "--config.train.log_every=1", "--config.train.sample_every=2",
             "--config.checkpoint.every_steps=2", "--config.sample.num_images=4",
             "--config.sample.num_steps=2"]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def check_run_outputs(workdir, channels):
  rows = read_metrics(workdir)
  assert rows[0]["step"] == 0 and rows[0]["train/compile_seconds"] > 0
  by_step = {row["step"]: row for row in rows[1:]}
  assert sorted(by_step) == [1, 2]
  for row in by_step.values():
    for name in ("train/loss", "train/grad_norm", "train/param_norm", "train/learning_rate",
                 "train/steps_per_sec", "train/images_per_sec"):
      assert np.isfinite(row[name]) and row[name] >= 0, name
    assert any(name.startswith("train/loss_q") for name in row)
    np.testing.assert_allclose(row["train/images_per_sec"], 8 * row["train/steps_per_sec"],
                               rtol=1e-6)
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000002.png")))
  assert grid.shape[:2] == (2 * (8 + 2) + 2,) * 2  # 2x2 grid of 8x8 images, 2px padding
  assert (grid.ndim == 3 and grid.shape[-1] == 3) if channels == 3 else grid.ndim == 2
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  config = os.path.join(workdir, "checkpoints", "2", "config", "metadata")
  with open(config, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Both real runs, started together (their compiles overlap)."""
  root = tmp_path_factory.mktemp("cli")
  dirs = {"tfds": str(root / "tfds"), "mnist": str(root / "mnist")}
  tfds_run = start(["--config=configs/cifar_dit.py:tiny", f"--workdir={dirs['tfds']}",
                    *SMALL_RUN], mocked=True)
  mnist_run = start(["--config=configs/mnist_offline.py:tiny", f"--workdir={dirs['mnist']}",
                     *SMALL_RUN])
  return dirs, finish(tfds_run), finish(mnist_run)


def test_cli_trains_class_conditional_dit_on_mocked_tfds(runs):
  dirs, (code, stderr), _ = runs
  assert code == 0, stderr[-3000:]
  saved = check_run_outputs(dirs["tfds"], channels=3)
  assert saved["config"]["data"]["name"] == "cifar10"
  assert saved["signature"]["dataset num_classes"] == 10
  assert saved["signature"]["model.class_conditional"] is True


def test_cli_trains_on_offline_mnist(runs):
  dirs, _, (code, stderr) = runs
  assert code == 0, stderr[-3000:]
  saved = check_run_outputs(dirs["mnist"], channels=1)
  assert saved["config"]["model"]["name"] == "unet-tiny"
  assert saved["dataset"]["num_examples"] == 5000


def digest(directory):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        h.update(os.path.join(root, name).encode() + f.read())
  return h.hexdigest()


BAD_INPUTS = {
    "unknown_key": (["--config=configs/mnist_offline.py:tiny", "--config.modle.depth=4"], 1,
                    "modle"),
    "patch_size": (["--config=configs/cifar_dit.py:tiny", "--config.data.source=mnist_offline",
                    "--config.data.image_size=15"], 1, "patch size 2"),
    "batch_vs_devices": (["--config=configs/mnist_offline.py:tiny",
                          "--config.train.batch_size=6"], 4, "device count 4"),
    "missing_dataset": (["--config=configs/cifar_dit.py:tiny"], 1, "cifar10"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  started = {name: (start([*args, f"--workdir={root / name}"], devices), root / name)
             for name, (args, devices, _) in BAD_INPUTS.items()}
  return {name: (*finish(process), workdir) for name, (process, workdir) in started.items()}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_runs, name):
  code, stderr, workdir = bad_runs[name]
  lines = stderr.strip().splitlines()
  assert code == 2, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  assert BAD_INPUTS[name][2] in lines[0]
  assert not os.path.exists(workdir)


def test_cli_splits_the_cpu_into_the_configs_mesh_cpu_devices(tmp_path):
  # Without a device count in XLA_FLAGS, the command makes mesh.cpu_devices devices: the batch
  # check then names that count (one device would accept any batch).
  workdir = tmp_path / "run"
  code, stderr = finish(start(["--config=configs/mnist_offline.py:tiny", f"--workdir={workdir}",
                               "--config.mesh.cpu_devices=3", "--config.train.batch_size=4"],
                              devices=None))
  assert code == 2, stderr[-3000:]
  assert "device count 3" in stderr.strip().splitlines()[-1]
  assert not os.path.exists(workdir)


def test_corrupted_latest_checkpoint_through_the_cli(runs, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  dirs, _, (code, _) = runs
  assert code == 0
  workdir = str(tmp_path / "mnist")
  shutil.copytree(dirs["mnist"], workdir)
  metadata = os.path.join(workdir, "checkpoints", "2", "_CHECKPOINT_METADATA")
  with open(metadata, "w", encoding="utf-8") as f:
    f.write("{not json")
  config_item = os.path.join(workdir, "checkpoints", "2", "config", "metadata")
  with open(config_item, "w", encoding="utf-8") as f:
    f.write("{not json")
  before = digest(workdir)
  code, stderr = finish(start(["--config=configs/mnist_offline.py:tiny", f"--workdir={workdir}",
                               *SMALL_RUN[:1], "--config.train.num_steps=4"]))
  lines = stderr.strip().splitlines()
  assert code == 2 and len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith("error: checkpoint step 2") and "untouched" in lines[0]
  assert digest(workdir) == before


@pytest.mark.slow  # two minutes: a training run plus torch-fidelity's Inception
def test_fid_during_training_matches_torch_fidelity_features(tmp_path):
  """eval.fid_every: the logged proxy FID equals FID from torch-fidelity's network on the same
  EMA samples (regenerated from the checkpoint), in closed form."""
  import hashlib as hashlib_  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import fidelity_reference  # pylint: disable=g-import-not-at-top
  from configs import mnist_offline  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import builder, checkpoint, loop  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import state as state_lib  # pylint: disable=g-import-not-at-top

  source = fidelity_reference.random_inception_path()
  digest = hashlib_.sha256(open(source, "rb").read()).hexdigest()
  weights = tmp_path / f"weights-inception-random-{digest[:8]}.pth"
  shutil.copy(source, weights)
  n = 6
  reference = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / "ref.npz", arr_0=reference)
  config = mnist_offline.get_config("tiny")
  config.train.sample_every = 0
  config.eval.fid_every = 8
  config.eval.num_samples = n
  config.eval.inception_weights = str(weights)
  config.eval.reference_stats = str(tmp_path / "ref.npz")
  devices = jax.devices()[:1]
  loop.train(config, str(tmp_path / "run"), devices=devices)

  logged = [r for r in read_metrics(tmp_path / "run") if "eval/fid" in r]
  assert [r["step"] for r in logged] == [8] and logged[0]["eval/fid_num_samples"] == n

  run = builder.build_run(config, devices=devices)
  decay = run.config.sample.ema_decay
  *_, ema = checkpoint.restore_for_inference(str(tmp_path / "run"))
  # The FID stream's samples, in one call rather than the loop's chunks of sample.num_images.
  generate = builder.make_ema_sampler(run, builder.FID_STREAM, batch_size=n)
  restored = state_lib.TrainState(step=None, params=None, opt_state=None,
                                  ema_params={state_lib.ema_key(decay): ema[decay]})
  samples = np.repeat(generate(restored, n), 3, axis=-1)  # grey digits, as the FID network sees them
  pool = fidelity_reference.reference_features(
      str(weights), np.concatenate([samples, reference]))["pool"].astype(np.float64)
  x1, x2 = pool[:n], pool[n:]
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  # tr((S1 S2)^(1/2)) = sum of the singular values of C1 C2^T / (n - 1) for n < D.
  trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / (n - 1)
  expected = (np.sum((x1.mean(0) - x2.mean(0)) ** 2)
              + (np.sum(c1 ** 2) + np.sum(c2 ** 2)) / (n - 1) - 2 * trace_sqrt)
  assert logged[0]["eval/fid"] == pytest.approx(expected, rel=1e-3)
