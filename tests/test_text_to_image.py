"""End-to-end text-to-image fine-tuning: `python -m jaxdiff.train --config=configs/mnist_captions.py`
on the tiny random Stable Diffusion pipeline and its cached captioned digits (the `tiny_sd`
fixture), resumed bit-identically, then sampled with prompts through the sample CLI.

The sampling reference: with linear warmup the step-0 update has learning rate 0, so the raw
params of checkpoint 1 are the pipeline's U-Net; sampling that checkpoint must then give the
images of sampling the pipeline folder itself, which tests/test_convert_pipeline.py checks
against diffusers' StableDiffusionPipeline.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff import sample
from jaxdiff.diffusion import SamplerSettings
from jaxdiff.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, text=True,
                        capture_output=True, timeout=600)


def _train_args(tiny_sd, workdir):
  return ["--config=configs/mnist_captions.py", f"--workdir={workdir}",
          f"--config.text.pipeline={tiny_sd['pipeline']}",
          f"--config.data.latents_dir={tiny_sd['cache']}", "--config.train.num_steps=4",
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.progress_bar=false", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.max_to_keep=10", "--config.optimizer.warmup_steps=2",
          "--config.text.caption_dropout_prob=0.5"]


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
  """A 4-step run, and a copy resumed from its step-2 checkpoint in a new process."""
  root = tmp_path_factory.mktemp("t2i")
  full, resumed = str(root / "full"), str(root / "resumed")
  result = _run("jaxdiff.train", *_train_args(tiny_sd, full))
  assert result.returncode == 0, result.stderr[-3000:]
  shutil.copytree(full, resumed)
  for step in ("3", "4"):
    shutil.rmtree(os.path.join(resumed, "checkpoints", step))
  result = _run("jaxdiff.train", *_train_args(tiny_sd, resumed))
  assert result.returncode == 0, result.stderr[-3000:]
  return full, resumed


@pytest.mark.slow  # trains through two CLI processes (about 2.5 min on 2 cores)
def test_fine_tuning_resumes_bit_identically_and_moves_the_weights(run, tiny_sd):
  full, resumed = run
  config, _, params, ema = checkpoint.restore_for_inference(full, 4)
  _, _, params_again, ema_again = checkpoint.restore_for_inference(resumed, 4)
  for got, want in ((params_again, params), (ema_again[0.99], ema[0.99])):
    for a, b in zip(jax_leaves(got), jax_leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert config.text.pipeline == tiny_sd["pipeline"]
  assert checkpoint.saved_dataset_info(full, 4).image_size == 8  # the latents' side
  _, _, first, _ = checkpoint.restore_for_inference(full, 1)
  _, pipeline_params = _pipeline_unet(tiny_sd)
  for a, b in zip(jax_leaves(first), jax_leaves(pipeline_params)):  # lr(0) = 0: unchanged
    np.testing.assert_array_equal(a, b)
  assert max(np.abs(a - b).max() for a, b in zip(jax_leaves(params), jax_leaves(first))) > 0


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _pipeline_unet(tiny_sd):
  from jaxdiff.convert import load_diffusers  # pylint: disable=g-import-not-at-top
  return load_diffusers(os.path.join(tiny_sd["pipeline"], "unet"))


def _samples(**fields) -> np.ndarray:
  options = sample.SampleOptions(
      prompt="a handwritten digit 3", negative_prompt="a handwritten digit 5", num_samples=4,
      batch_size=4, sampler=SamplerSettings(num_steps=3, guidance_scale=3.0), **fields)
  paths = sample.run(options)
  return np.load(paths["npz"])["arr_0"]


@pytest.mark.slow  # trains through two CLI processes (about 2.5 min on 2 cores)
def test_the_run_samples_as_its_pipeline_with_the_fine_tuned_unet(run, tiny_sd, tmp_path):
  full, _ = run
  at_step_1 = _samples(workdir=full, step=1, use_ema=False, out=str(tmp_path / "run"))
  pipeline = _samples(diffusers=tiny_sd["pipeline"], out=str(tmp_path / "pipeline"))
  assert at_step_1.shape == (4, 16, 16, 1)
  np.testing.assert_array_equal(at_step_1, pipeline)


@pytest.mark.slow  # trains through two CLI processes (about 2.5 min on 2 cores)
def test_sample_cli_on_the_run_writes_prompted_images(run, tmp_path):
  full, _ = run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a handwritten digit 1\na handwritten digit 7\n")
  result = _run("jaxdiff.sample", f"--workdir={full}", f"--prompts={prompts}",
                "--guidance_scale=2", "--num_steps=2", "--num_samples=4",
                f"--out={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-3000:]
  (npz,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".npz")]
  saved = np.load(tmp_path / "out" / npz)
  assert saved["arr_0"].shape == (4, 16, 16, 1)
  assert saved["prompts"].tolist() == ["a handwritten digit 1", "a handwritten digit 7"]
  np.testing.assert_array_equal(saved["prompt_index"], [0, 1, 0, 1])
  result = _run("jaxdiff.sample", f"--workdir={full}", "--num_samples=2")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {full} is a text-to-image run; pass --prompt or --prompts"]


@pytest.mark.slow
def test_guidance_with_a_digit_prompt_picks_that_digit(tmp_path):
  """configs/mnist_captions.py end to end on all 5,000 captioned digits (about 10 minutes on a
  2-core CPU): guided samples are classified as the prompted digit far above chance (0.1)."""
  from experiments import t2i_digits  # pylint: disable=g-import-not-at-top
  results = t2i_digits.run(str(tmp_path), steps=1500, samples=16, scales=(1.0, 4.0))
  guided = results["prompted_digit_fraction"]["4"]
  assert results["classifier_accuracy_on_training_latents"] > 0.5
  assert guided["all"] > 0.8 and min(guided["per_digit"]) > 0.5  # 2,000 steps: 0.98, 0.88
  assert guided["all"] > results["prompted_digit_fraction"]["1"]["all"]


def test_a_cache_without_captions_or_from_another_pipeline_is_refused(tiny_sd, tmp_path):
  from configs import mnist_captions  # pylint: disable=g-import-not-at-top
  from jaxdiff.config import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxdiff.convert import load_diffusers  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import DataConfig, encode  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import builder  # pylint: disable=g-import-not-at-top
  config = mnist_captions.get_config()
  config.text.pipeline, config.data.latents_dir = tiny_sd["pipeline"], tiny_sd["cache"]
  config.train.batch_size = 8
  assert builder.build_run(config).null_context.shape == (8, 32)
  other = str(tmp_path / "copy_of_the_pipeline")
  shutil.copytree(tiny_sd["pipeline"], other)
  config.text.pipeline = other
  with pytest.raises(ConfigError, match=r"config\.text\.pipeline=.*were encoded with"):
    builder.build_run(config)
  vae = load_diffusers(os.path.join(tiny_sd["pipeline"], "vae"))
  images = DataConfig(source="captions", folder=tiny_sd["digits"], image_size=16, fit="resize",
                      channels=1)
  encode.encode_dataset(images, *vae, str(tmp_path / "no_text"))
  config.text.pipeline, config.data.latents_dir = tiny_sd["pipeline"], str(tmp_path / "no_text")
  with pytest.raises(ConfigError, match=r"config\.data\.latents_dir=.*no caption embeddings"):
    builder.build_run(config)
