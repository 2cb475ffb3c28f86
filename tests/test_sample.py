"""jaxdiff.sample, the sampling CLI: checkpoints and diffusers folders, output files, bad input.

References: diffusers' own UNet2DModel with its DDIMScheduler (PyTorch) for the diffusers-folder
path, and the grid of the written npz for the PNG and GIF.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

import tiny_pipelines
from jaxdiff import diffusion, sample, sampling
from jaxdiff.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 2)


def _save_diffusers_unet(path) -> UNet2DModel:
  """A tiny class-conditional UNet2DModel with every weight perturbed away from its init."""
  torch.manual_seed(0)
  model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                      layers_per_block=1, norm_num_groups=8, num_class_embeds=3,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def test_diffusers_folder_matches_diffusers_ddim(tmp_path):
  """The CLI's run() on a diffusers folder vs diffusers' UNet + DDIMScheduler from the same x_T."""
  folder = str(tmp_path / "unet")
  torch_model = _save_diffusers_unet(folder)
  options = sample.SampleOptions(
      diffusers=folder, sampler=sampling.SamplerSettings(method="ddim", num_steps=3),
      labels=(2, 0), num_samples=5, batch_size=8, seed=11, out=str(tmp_path / "out"))
  paths = sample.run(options)

  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                            set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
  scheduler.set_timesteps(3)
  keys = [jax.random.split(jax.random.fold_in(jax.random.key(11), i))[0] for i in range(5)]
  x = torch.from_numpy(np.stack([np.asarray(jax.random.normal(k, (8, 8, 1))) for k in keys]))
  x = x.permute(0, 3, 1, 2).double()
  labels = torch.tensor([2, 0, 2, 0, 2])
  with torch.no_grad():
    for t in scheduler.timesteps:
      eps = torch_model(x.float(), t, class_labels=labels).sample.double()
      x = scheduler.step(eps, t, x).prev_sample
  x = x.permute(0, 2, 3, 1).numpy()
  want = np.round(np.clip((x + 1) * 127.5, 0, 255))

  with np.load(paths["npz"], allow_pickle=False) as data:
    got = data["arr_0"]
    np.testing.assert_array_equal(data["arr_1"], labels.numpy())
    assert int(data["checkpoint_step"]) == -1 and str(data["method"]) == "ddim"
    assert int(data["num_steps"]) == 3 and int(data["seed"]) == 11
  assert got.shape == (5, 8, 8, 1) and got.dtype == np.uint8
  assert got.std() > 10
  assert np.abs(got.astype(np.int32) - want).max() <= 1  # float32 vs float64 at a .5 boundary.
  assert np.mean(got == want) > 0.98
  with Image.open(paths["png"]) as grid:
    assert grid.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # ceil(sqrt(5)) = 3 columns, 2 rows.
  assert "gif" not in paths


def test_pipeline_scheduler_config_is_honoured(tmp_path):
  """A pipeline folder's scheduler config (DPM-Solver++, scaled_linear betas, v-prediction,
  steps_offset, its default linspace grid) drives the sampler: the CLI's run() on pipe/unet with
  no sampler flags equals diffusers' DPMSolverMultistepScheduler loop from the same x_T."""
  folder = str(tmp_path / "pipe" / "unet")
  torch_model = _save_diffusers_unet(folder)
  scheduler = DPMSolverMultistepScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      prediction_type="v_prediction", steps_offset=1)
  scheduler.save_config(str(tmp_path / "pipe" / "scheduler"))
  options = sample.SampleOptions(
      diffusers=folder, sampler=sampling.SamplerSettings(num_steps=4), labels=(1,),
      num_samples=3, batch_size=4, seed=5, out=str(tmp_path / "out"))
  paths = sample.run(options)

  scheduler.set_timesteps(4)
  keys = [jax.random.split(jax.random.fold_in(jax.random.key(5), i))[0] for i in range(3)]
  x = torch.from_numpy(np.stack([np.asarray(jax.random.normal(k, (8, 8, 1))) for k in keys]))
  x = x.permute(0, 3, 1, 2) * scheduler.init_noise_sigma
  labels = torch.tensor([1, 1, 1])
  with torch.no_grad():
    for t in scheduler.timesteps:
      v = torch_model(x, t, class_labels=labels).sample
      x = scheduler.step(v, t, x).prev_sample
  want = np.round(np.clip((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5, 0, 255))
  with np.load(paths["npz"], allow_pickle=False) as data:
    got = data["arr_0"]
    assert str(data["method"]) == "dpmpp_2m" and str(data["spacing"]) == "linspace"
  assert got.std() > 10
  assert np.abs(got.astype(np.int32) - want).max() <= 1
  assert np.mean(got == want) > 0.95

  contradicting = dataclasses.replace(options, prediction="eps")
  with pytest.raises(sample.SampleInputError, match="--prediction=eps contradicts"):
    sample.run(contradicting)
  DPMSolverMultistepScheduler(thresholding=True).save_config(str(tmp_path / "pipe" / "scheduler"))
  with pytest.raises(sample.SampleInputError, match="thresholding"):
    sample.run(options)


def test_stable_diffusion_pipeline_folder_writes_decoded_images(tmp_path):
  """run() on a StableDiffusionPipeline folder: the npz holds diffusers' images (same x_T,
  prompt, negative prompt, guidance, DPM-Solver++) quantised, and the prompts as metadata."""
  folder = str(tmp_path / "sd")
  pipe = tiny_pipelines.save_sd_pipeline(folder)
  options = sample.SampleOptions(
      diffusers=folder, prompt="a photo of the cat", negative_prompt="cat", num_samples=2,
      batch_size=4, seed=2, out=str(tmp_path / "out"),
      sampler=sampling.SamplerSettings(method="dpmpp_2m", num_steps=2, guidance_scale=7.5))
  paths = sample.run(options)

  keys = [jax.random.split(jax.random.fold_in(jax.random.key(2), i))[0] for i in range(2)]
  x = torch.from_numpy(np.stack([np.asarray(jax.random.normal(k, (8, 8, 4))) for k in keys]))
  with torch.no_grad(), tiny_pipelines.one_torch_thread():
    want = pipe(prompt="a photo of the cat", negative_prompt="cat", num_images_per_prompt=2,
                guidance_scale=7.5, num_inference_steps=2, latents=x.permute(0, 3, 1, 2),
                height=16, width=16, output_type="np").images
  want = np.round(want * 255)
  with np.load(paths["npz"], allow_pickle=False) as data:
    got = data["arr_0"]
    assert "arr_1" not in data.files
    assert list(data["prompts"]) == ["a photo of the cat"] and str(data["negative_prompt"]) == "cat"
    assert str(data["prompt_source"]) == "--prompt" and list(data["prompt_index"]) == [0, 0]
    assert str(data["method"]) == "dpmpp_2m" and float(data["guidance_scale"]) == 7.5
  assert got.shape == (2, 16, 16, 3) and got.std() > 10
  assert np.abs(got.astype(np.int32) - want).max() <= 1  # float32 rounding at a .5 boundary
  assert sorted(paths) == ["npz", "png"]


@pytest.mark.slow
def test_dit_pipeline_folder_animates_decoded_latents(tmp_path):
  """run() on a DiTPipeline folder with --animate: RGB images, labels in arr_1, and a GIF of the
  decoded reverse process that ends on the samples (up to the GIF's 256-colour palette)."""
  folder = str(tmp_path / "dit")
  tiny_pipelines.save_dit_pipeline(folder)
  options = sample.SampleOptions(
      diffusers=folder, labels=(5, 9), num_samples=4, batch_size=4, seed=1, animate=True,
      animate_frames=3, out=str(tmp_path / "out"),
      sampler=sampling.SamplerSettings(num_steps=3, guidance_scale=3.0))
  paths = sample.run(options)
  with np.load(paths["npz"], allow_pickle=False) as data:
    got = data["arr_0"]
    np.testing.assert_array_equal(data["arr_1"], [5, 9, 5, 9])
  assert got.shape == (4, 16, 16, 3) and got.std() > 10
  grid = sampling.images.make_grid(got).astype(np.int32)
  with Image.open(paths["gif"]) as gif:
    assert gif.n_frames == 3
    first = np.asarray(gif.convert("RGB")).astype(np.int32)
    gif.seek(2)
    last = np.asarray(gif.convert("RGB")).astype(np.int32)
  last_error, first_error = np.abs(last - grid).mean(), np.abs(first - grid).mean()
  assert last_error < 10 and last_error < first_error / 3, (last_error, first_error)


def test_bad_inputs_are_rejected_before_loading(tmp_path):
  settings = sampling.SamplerSettings
  cases = {
      "exactly one of --workdir": sample.SampleOptions(),
      "is not a directory": sample.SampleOptions(workdir=str(tmp_path / "missing")),
      "--method='dpm'": sample.SampleOptions(workdir=str(tmp_path),
                                             sampler=settings(method="dpm")),
      "--num_samples=0 must be > 0": sample.SampleOptions(workdir=str(tmp_path), num_samples=0),
      "--labels=3,-1 must be >= 0": sample.SampleOptions(workdir=str(tmp_path), labels=(3, -1)),
      "--guidance_scale=-1": sample.SampleOptions(workdir=str(tmp_path),
                                                  sampler=settings(guidance_scale=-1.0)),
      "at most one of --prompt and --prompts": sample.SampleOptions(
          diffusers=str(tmp_path), prompt="a", prompts=str(tmp_path)),
      "--prompts=nope is not a file": sample.SampleOptions(diffusers=str(tmp_path),
                                                           prompts="nope"),
  }
  for message, options in cases.items():
    with pytest.raises(sample.SampleInputError, match=message.replace("[", r"\[")):
      sample.check_options(options)


def test_bad_inputs_are_rejected_against_the_model():
  schedule = diffusion.make_schedule("linear", 60)
  unconditional = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE)
  no_null = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE, num_classes=3)
  flow = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE, objective="flow")
  edm = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE, objective="edm")
  text_model = sampling.DiffusionModel(
      None, {}, schedule, "eps", SHAPE,
      text=sampling.TextConditioning(("a cat",), np.zeros((1, 4, 8)), np.zeros((4, 8))))
  cases = [
      (unconditional, sample.SampleOptions(labels=(1,)), "model is unconditional"),
      (unconditional, sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=2.0)),
       "needs a class-conditional model"),
      (no_null, sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=2.0)),
       "trained with label dropout"),
      (no_null, sample.SampleOptions(labels=(0, 3)), r"--labels \[3\] out of range"),
      (no_null, sample.SampleOptions(sampler=sampling.SamplerSettings(num_steps=61)),
       "exceeds the model's 60 diffusion timesteps"),
      (flow, sample.SampleOptions(sampler=sampling.SamplerSettings(method="ddim")),
       "--method='ddim' cannot sample this flow model; choose one of euler, heun, euler_maruyama"),
      (edm, sample.SampleOptions(sampler=sampling.SamplerSettings(method="euler")),
       "--method='euler' cannot sample this edm model; choose one of heun"),
      (edm, sample.SampleOptions(sampler=sampling.SamplerSettings(num_steps=1)),
       "--num_steps=1 must be >= 2 for EDM"),
      (no_null, sample.SampleOptions(prompt="a cat"), "need a text-to-image pipeline"),
      (text_model, sample.SampleOptions(negative_prompt="dog"), "needs a text-to-image pipeline "
       "and --guidance_scale"),
      (text_model, sample.SampleOptions(labels=(1,)), "the model is text-conditioned"),
  ]
  for model, options, message in cases:
    with pytest.raises(sample.SampleInputError, match=message):
      sample.check_against_model(options, model)
  sample.check_against_model(sample.SampleOptions(
      negative_prompt="dog", sampler=sampling.SamplerSettings(guidance_scale=7.5)), text_model)
  # Guidance scale 1 is the conditional model: no null label needed.
  sample.check_against_model(
      sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=1.0)), no_null)
  # A flow model takes more steps than the DDPM timestep count; euler_maruyama passes the CLI.
  sample.check_against_model(sample.SampleOptions(sampler=sampling.SamplerSettings(
      method="euler_maruyama", num_steps=250)), flow)


def test_pick_ema_decay():
  ema = {0.9: "a", 0.99: "b"}
  assert sample.pick_ema_decay(ema, None, 0.99) == 0.99
  assert sample.pick_ema_decay(ema, None, 0.5) == 0.9  # Default not kept: the first.
  assert sample.pick_ema_decay(ema, 0.9, 0.99) == 0.9
  with pytest.raises(sample.SampleInputError, match="not one of this run's EMA decays"):
    sample.pick_ema_decay(ema, 0.5, 0.9)
  with pytest.raises(sample.SampleInputError, match="--use_ema=false"):
    sample.pick_ema_decay({}, None, 0.9)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return subprocess.run([sys.executable, "-m", "jaxdiff.sample", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A class-conditional dit-tiny trained for one step by the training library on MNIST."""
  from configs import mnist_offline  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import loop  # pylint: disable=g-import-not-at-top
  config = mnist_offline.get_config("model=dit-s/2,tiny,steps=1")
  config.unlock()
  config.train.sample_every = 0
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.checkpoint.async_save = False
  config.sample.method, config.sample.num_steps = "dpmpp_2m", 20  # not the CLI's fallback
  config.sample.spacing = "trailing"
  config.sample.guidance_scale, config.sample.guidance_interval = 1.5, (10, 90)  # T = 100
  config.lock()
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_cli_on_a_training_checkpoint_writes_png_gif_npz(trained_workdir, tmp_path):
  out = str(tmp_path / "out")
  result = _cli(f"--workdir={trained_workdir}", "--method=ddim", "--num_steps=3",
                "--num_samples=6", "--batch_size=4", "--labels=3,7", "--guidance_scale=2",
                "--seed=1", "--animate", "--animate_frames=3", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  tag = "step1_ema0.9_ddim3_cfg2_clip_seed1_n6"  # The run's config.sample.clip_denoised=True.
  assert sorted(os.listdir(out)) == [f"grid_{tag}.png", f"reverse_{tag}.gif",
                                     f"samples_{tag}.npz"]
  with np.load(os.path.join(out, f"samples_{tag}.npz"), allow_pickle=False) as data:
    samples = data["arr_0"]
    assert samples.shape == (6, 16, 16, 1) and samples.dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], [3, 7, 3, 7, 3, 7])
    assert int(data["checkpoint_step"]) == 1 and bool(data["use_ema"])
    assert float(data["ema_decay"]) == 0.9 and float(data["guidance_scale"]) == 2.0
    assert str(data["method"]) == "ddim" and int(data["num_steps"]) == 3
    assert bool(data["clip_denoised"])
  assert samples.std() > 1
  with Image.open(os.path.join(out, f"grid_{tag}.png")) as grid:
    assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    np.testing.assert_array_equal(np.asarray(grid), sampling.images.make_grid(samples)[..., 0])
  with Image.open(os.path.join(out, f"reverse_{tag}.gif")) as gif:
    assert gif.n_frames == 3 and gif.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    gif.seek(2)
    last = np.asarray(gif.convert("L"))
  # The animation is a separate sampler run; its last state must be the same samples.
  np.testing.assert_array_equal(last, sampling.images.make_grid(samples)[..., 0])


def test_unset_sampler_settings_come_from_the_runs_config(trained_workdir):
  """The run was configured with dpmpp_2m at 20 trailing steps, guided at 1.5 between
  timesteps 10 and 90; leaving those flags unset must sample as its previews did, not with
  the CLI's own fallback (ddim, 50, unguided)."""
  options = sample.SampleOptions(workdir=trained_workdir, num_samples=2, batch_size=2)
  _, _, resolved = sample.load_model(options)
  config = checkpoint.restore_for_inference(trained_workdir, 1)[0]
  assert (config.sample.sampler.method, config.sample.sampler.num_steps) == ("dpmpp_2m", 20)
  assert (resolved.sampler.method, resolved.sampler.num_steps) == ("dpmpp_2m", 20)
  assert resolved.sampler.spacing == "trailing" and resolved.sampler.eta == 0.0
  assert resolved.sampler.guidance_scale == 1.5 and resolved.sampler.guided
  assert resolved.sampler.guidance_interval == (10, 90)
  given = sample.SampleOptions(workdir=trained_workdir, sampler=sampling.SamplerSettings(
      method="ddim", num_steps=7, guidance_scale=1.0, guidance_interval=(0, 50)))
  _, _, resolved = sample.load_model(given)
  assert (resolved.sampler.method, resolved.sampler.num_steps) == ("ddim", 7)
  assert resolved.sampler.guidance_scale == 1.0 and not resolved.sampler.guided
  assert resolved.sampler.guidance_interval == (0, 50)


@pytest.mark.parametrize("args,message", [
    (["--labels=10"], "--labels [10] out of range: the model has 10 classes"),
    (["--step=7"], "no checkpoint at step 7"),
])
def test_cli_bad_input_is_one_line(trained_workdir, args, message):
  result = _cli(f"--workdir={trained_workdir}", *args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_cli_rejects_bad_flags_without_a_model(tmp_path):
  result = _cli(f"--workdir={tmp_path}", "--num_samples=0")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and lines == ["error: --num_samples=0 must be > 0"]


def test_cli_bad_labels_and_unknown_flags_are_one_line(tmp_path):
  for args, message in ((["--labels=a,b"], "--labels='a,b' must be comma-separated integers"),
                        (["--num_sample=3"], "bad flag")):
    result = _cli(f"--workdir={tmp_path}", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.slow  # trains a latent run and decodes through torch (about 30 s on 2 cores)
def test_latent_run_samples_are_decoded_like_diffusers_decodes_them(tmp_path):
  """A DiT trained on the latents of a diffusers AutoencoderKL folder: the sample CLI's images
  equal its latents (sampled here without a decoder, same keys and labels), unscaled by the
  folder's scaling and shift factors and decoded by diffusers' own AutoencoderKL in PyTorch."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  import latent_runs  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import checkpoint  # pylint: disable=g-import-not-at-top
  workdir, vae_folder, _ = latent_runs.make_latent_run(tmp_path)
  settings = diffusion.SamplerSettings(method="ddim", num_steps=2)
  options = sample.SampleOptions(workdir=workdir, sampler=settings, num_samples=4, batch_size=4,
                                 out=str(tmp_path / "out"))
  with jax.default_matmul_precision("highest"):
    paths = sample.run(options)
  written = np.load(paths["npz"])["arr_0"]
  assert written.shape == (4, 16, 16, 3)

  config, module, _, ema = checkpoint.restore_for_inference(workdir)
  model = sampling.DiffusionModel.from_config(module, ema[config.sample.ema_decay],
                                              config.diffusion, (8, 8, 4))
  labels = sampling.example_labels(4, (), model.num_classes)
  batch_fn = sampling.make_batch_fn(model, dataclasses.replace(settings, clip_denoised=False))
  with jax.default_matmul_precision("highest"):
    z = np.asarray(batch_fn(model.params, sampling.seed_key_data(0),
                            np.arange(4, dtype=np.int32), labels), np.float32)
  vae = AutoencoderKL.from_pretrained(vae_folder).eval()
  with torch.no_grad():
    unscaled = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()) / 0.5 + 0.1
    want = vae.decode(unscaled).sample.numpy().transpose(0, 2, 3, 1)
  diff = np.abs(written.astype(int) - sampling.images.to_uint8(want).astype(int))
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.95
  assert written.std() > 1  # decoded images, not a constant

  with pytest.raises(sample.SampleInputError, match="--autoencoder=.*does not exist"):
    sample.run(dataclasses.replace(options, autoencoder=str(tmp_path / "nope")))
  with pytest.raises(sample.SampleInputError, match="--autoencoder is for latent"):
    sample.run(dataclasses.replace(options, workdir=None, diffusers=vae_folder,
                                   autoencoder=vae_folder))


def test_a_text_run_takes_its_pipelines_scheduler_and_keeps_its_own_steps_and_guidance(tmp_path):
  """`with_pipeline` for a run fine-tuned from a pipeline whose DPM-Solver++ scheduler config
  matches the run's schedule: the scheduler's method, spacing, clipping and steps_offset replace
  the run's; the run's steps, eta and guidance stay. A run on another schedule keeps all its own."""
  folder = str(tmp_path / "sd")
  tiny_pipelines.save_sd_pipeline(folder)
  options = sample.SampleOptions(diffusers=folder, prompt="a photo of the cat")
  pipeline_model, _ = sample.load_pipeline_model(options)
  run_model = dataclasses.replace(pipeline_model, scheduler_kwargs={}, decoder=None, text=None)
  run_defaults = {"method": "ddim", "num_steps": 17, "spacing": "trailing", "eta": 0.3,
                  "clip_denoised": True, "guidance_scale": 4.0, "guidance_interval": (100, 900),
                  "guidance_rescale": 0.5}
  run_options = sample.SampleOptions(workdir=str(tmp_path / "run"), prompt="a photo of the cat")

  model, defaults = sample.with_pipeline(run_model, folder, run_options, dict(run_defaults))
  # DPMSolverMultistepScheduler's defaults: 2nd-order multistep DPM-Solver++, linspace timesteps,
  # no clipping; the pipeline sets steps_offset=1.
  assert defaults == {**run_defaults, "method": "dpmpp_2m", "spacing": "linspace",
                      "clip_denoised": False}
  assert model.scheduler_kwargs["steps_offset"] == 1
  assert model.decoder is not None and model.text is not None

  other = dataclasses.replace(run_model, schedule=diffusion.make_schedule("linear", 1000))
  model, defaults = sample.with_pipeline(other, folder, run_options, dict(run_defaults))
  assert defaults == run_defaults and not model.scheduler_kwargs
