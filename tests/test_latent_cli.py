"""End-to-end: latent diffusion offline through the real CLIs, with the configs' tiny variants.

python -m jaxdiff.train (configs/mnist_autoencoder.py:tiny) -> python -m jaxdiff.data.encode
(--autoencoder=that run) -> python -m jaxdiff.train (configs/mnist_latent_dit.py:tiny) ->
python -m jaxdiff.sample, each in a subprocess; then the bad inputs of a latent run. References:
the autoencoder's own encoder and decoder called in this process on the saved EMA params.

Subprocesses compile with LLVM optimisation off, as in test_train_cli.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from test_train_cli import REPO, env, read_metrics

AE_STEPS = 30


def _run(module: str, *args: str, timeout: int = 400) -> tuple[int, str]:
  process = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=timeout)
  return process.returncode, process.stderr


# The whole offline chain through the real CLIs takes over a minute on 2 cores: a slow check.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """The four commands of configs/mnist_latent_dit.py's docstring, tiny."""
  root = tmp_path_factory.mktemp("latent")
  paths = {name: str(root / name) for name in ("ae", "latents", "dit", "samples")}
  results = {}
  results["ae"] = _run(
      "jaxdiff.train", "--config=configs/mnist_autoencoder.py:tiny", f"--workdir={paths['ae']}",
      f"--config.train.num_steps={AE_STEPS}", "--config.train.log_every=5",
      "--config.optimizer.learning_rate=3e-3", f"--config.train.sample_every={AE_STEPS}",
      f"--config.checkpoint.every_steps={AE_STEPS}", "--config.checkpoint.async_save=false")
  if results["ae"][0] == 0:
    results["encode"] = _run(
        "jaxdiff.data.encode", f"--autoencoder={paths['ae']}", "--source=mnist_offline",
        "--image_size=16", "--scaling_factor=auto", f"--output_dir={paths['latents']}",
        "--batch_size=500")
  if results.get("encode", (1,))[0] == 0:
    results["dit"] = _run(
        "jaxdiff.train", "--config=configs/mnist_latent_dit.py:tiny", f"--workdir={paths['dit']}",
        f"--config.autoencoder.path={paths['ae']}", f"--config.data.latents_dir={paths['latents']}",
        "--config.train.num_steps=2", "--config.train.log_every=1",
        "--config.train.sample_every=2", "--config.checkpoint.every_steps=2",
        "--config.sample.num_images=4", "--config.sample.num_steps=2")
  if results.get("dit", (1,))[0] == 0:
    results["sample"] = _run(
        "jaxdiff.sample", f"--workdir={paths['dit']}", "--num_samples=4", "--batch_size=4",
        "--num_steps=2", "--method=ddim", f"--out={paths['samples']}")
  return paths, results


def _ok(chain, name):
  _, results = chain
  assert name in results, f"an earlier command failed: {results}"
  code, stderr = results[name]
  assert code == 0, stderr[-3000:]


def _digits(count: int) -> np.ndarray:
  """The first offline digits at 16x16, float32 in [-1, 1] (the encoder's input)."""
  from jaxdiff import data  # pylint: disable=g-import-not-at-top
  cfg = data.DataConfig(source="mnist_offline", image_size=16)
  images = next(data.iterate_dataset(cfg, batch_size=count))["image"]
  return images.astype(np.float32) / 127.5 - 1.0


def test_autoencoder_run_learns_and_previews_reconstructions(chain):
  _ok(chain, "ae")
  paths, _ = chain
  rows = [row for row in read_metrics(paths["ae"]) if "train/loss" in row]
  assert [row["step"] for row in rows] == list(range(5, AE_STEPS + 1, 5))
  assert all(np.isfinite(row["train/kl"]) and row["train/kl"] > 0 for row in rows)
  assert rows[-1]["train/reconstruction"] < 0.8 * rows[0]["train/reconstruction"]
  grid = np.asarray(Image.open(os.path.join(paths["ae"], "samples",
                                            f"step_{AE_STEPS:06d}.png")))
  # 4 previews (tiny) of a 16x16 digit beside its reconstruction: 2x2 cells of 16x32.
  assert grid.shape == (2 * (16 + 2) + 2, 2 * (32 + 2) + 2)


def test_encode_stores_the_posterior_of_the_runs_ema_params(chain):
  _ok(chain, "encode")
  paths, _ = chain
  from jaxdiff.data import latents  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import checkpoint  # pylint: disable=g-import-not-at-top
  info = latents.read_latents_info(paths["latents"])
  assert (info["num_examples"], info["latent_shape"], info["variants"]) == (5000, [8, 8, 4], 1)
  assert info["scaling_factor"] == info["suggested_scaling_factor"]  # --scaling_factor=auto
  assert info["autoencoder"] == os.path.abspath(paths["ae"])
  module, params = checkpoint.load_autoencoder(paths["ae"])
  with jax.default_matmul_precision("highest"):
    mean, logvar = module.apply({"params": params}, _digits(3), method=module.encode)
  source = latents.LatentSource(paths["latents"], random_flip=False)
  stored = np.stack([source[i]["moments"][0] for i in range(3)])  # [3, 2, 8, 8, 4]
  np.testing.assert_allclose(stored[:, 0], mean, rtol=0, atol=1e-4 * np.abs(mean).max())
  np.testing.assert_allclose(stored[:, 1], np.exp(0.5 * np.asarray(logvar)), rtol=1e-4)


def test_latent_dit_run_trains_on_latents_and_previews_decoded_digits(chain):
  _ok(chain, "dit")
  paths, _ = chain
  saved = json.load(open(os.path.join(paths["dit"], "checkpoints", "2", "config", "metadata"),
                         encoding="utf-8"))
  info = json.load(open(os.path.join(paths["latents"], "latents.json"), encoding="utf-8"))
  assert saved["dataset"]["image_size"] == 8 and saved["dataset"]["channels"] == 4
  assert saved["latents"] == {k: info[k] for k in ("latent_shape", "scaling_factor",
                                                     "shift_factor")}
  grid = np.asarray(Image.open(os.path.join(paths["dit"], "samples", "step_000002.png")))
  assert grid.shape == (2 * (16 + 2) + 2,) * 2  # 4 decoded 16x16x1 digits, not 8x8x4 latents


def test_sample_decodes_latents_with_the_runs_autoencoder(chain):
  """The CLI's images equal the run's DiT sampled here without a decoder (same keys and
  labels), unscaled by the latents' factor and decoded by the autoencoder's EMA params."""
  _ok(chain, "sample")
  paths, _ = chain
  from jaxdiff import images, sampling  # pylint: disable=g-import-not-at-top
  from jaxdiff.diffusion import SamplerSettings  # pylint: disable=g-import-not-at-top
  from jaxdiff.models import autoencoder  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import checkpoint  # pylint: disable=g-import-not-at-top
  [name] = [f for f in os.listdir(paths["samples"]) if f.endswith(".npz")]
  written = np.load(os.path.join(paths["samples"], name))
  assert written["arr_0"].shape == (4, 16, 16, 1) and written["arr_0"].dtype == np.uint8
  assert os.path.exists(os.path.join(paths["samples"], name.replace("samples_", "grid_")
                                     .replace(".npz", ".png")))

  config, module, _, ema = checkpoint.restore_for_inference(paths["dit"])
  model = sampling.DiffusionModel.from_config(module, ema[config.sample.ema_decay],
                                              config.diffusion, (8, 8, 4))
  settings = SamplerSettings(method="ddim", num_steps=2, clip_denoised=False)
  batch_fn = sampling.make_batch_fn(model, settings)
  labels = sampling.example_labels(4, (), model.num_classes)
  with jax.default_matmul_precision("highest"):
    z = batch_fn(model.params, sampling.seed_key_data(0), np.arange(4, dtype=np.int32), labels)
    ae, ae_params = checkpoint.load_autoencoder(paths["ae"])
    scale = json.load(open(os.path.join(paths["latents"], "latents.json"), encoding="utf-8"))
    unscaled = np.asarray(z) / scale["scaling_factor"] + scale["shift_factor"]
    decoded = autoencoder.decode_in_chunks(ae, ae_params, unscaled)
  want = images.to_uint8(decoded)
  diff = np.abs(written["arr_0"].astype(int) - want.astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.95
  np.testing.assert_array_equal(written["arr_1"], labels)


def test_bad_latent_inputs_are_one_line_exit_2_and_write_nothing(chain, tmp_path):
  _ok(chain, "encode")
  paths, _ = chain
  dit = ["--config=configs/mnist_latent_dit.py:tiny", f"--config.data.latents_dir={paths['latents']}"]
  cases = {
      "missing autoencoder": ([*dit, f"--config.autoencoder.path={tmp_path}/nope"],
                              "autoencoder.path"),
      "a diffusion run as the autoencoder": (
          [*dit, f"--config.autoencoder.path={paths['dit']}"] if "dit" in chain[1] else None,
          "not an autoencoder run"),
      "latents the DiT cannot patch": ([*dit, f"--config.autoencoder.path={paths['ae']}",
                                        "--config.model.overrides.patch_size=3"],
                                       "data.latents_dir"),
  }
  started = {}
  for name, (args, _) in cases.items():
    if args is not None:
      workdir = tmp_path / name.replace(" ", "_")
      started[name] = (subprocess.Popen(
          [sys.executable, "-m", "jaxdiff.train", *args, f"--workdir={workdir}"], cwd=REPO,
          env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), workdir)
  assert len(started) == len(cases), "the latent DiT run failed"
  for name, (process, workdir) in started.items():
    _, stderr = process.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, (name, stderr[-3000:])
    assert lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, lines[0])
    assert not workdir.exists(), name
  code, stderr = _run("jaxdiff.sample", f"--workdir={paths['ae']}", f"--out={tmp_path}/s")
  assert code == 2 and "autoencoder run" in stderr and not (tmp_path / "s").exists()
  code, stderr = _run("jaxdiff.data.encode", f"--autoencoder={tmp_path}/nope",
                      "--source=mnist_offline", f"--output_dir={tmp_path}/l")
  assert code == 2 and stderr.startswith("error: --autoencoder=") and "does not exist" in stderr
  assert not (tmp_path / "l").exists()
