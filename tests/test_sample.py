"""jaxdiff.sampling / jaxdiff.sample: device-count independent sampling, output files, the CLI.

References: a hand-written re-derivation of the per-example keys and of classifier-free guidance,
the same run on 1 and 4 devices, hand-computed uint8 values, and diffusers' own UNet2DModel with
its DDIMScheduler (PyTorch) for the diffusers-folder path.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from jaxdiff import diffusion, sample, sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 4, 2)


class ToyDenoiser(nn.Module):
  """A conditional denoiser that compiles in a fraction of a second (null label = num_classes)."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    del train
    y = jnp.full(x.shape[:1], self.num_classes) if y is None else y
    h = nn.Conv(x.shape[-1], (3, 3))(x) * (1.0 + jnp.asarray(t, jnp.float32) / 50.0)[:, None,
                                                                                     None, None]
    return jnp.tanh(h + nn.Embed(self.num_classes + 1, x.shape[-1])(y)[:, None, None, :])


@pytest.fixture(scope="module")
def toy():
  """(DiffusionModel, guided DDPM batch_fn): stochastic steps, so step noise is exercised too."""
  module = ToyDenoiser()
  x = jnp.zeros((1, *SHAPE))
  params = jax.jit(module.init)(jax.random.key(1), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  model = sampling.DiffusionModel(
      module, params["params"], diffusion.make_schedule("linear", 100), "eps", SHAPE,
      num_classes=3, has_null_label=True)
  settings = sampling.SamplerSettings(method="ddpm", num_steps=3, guidance_scale=2.5)
  return model, sampling.make_batch_fn(model, settings)


def test_same_samples_on_one_and_four_devices_any_batching(toy):
  model, batch_fn = toy
  labels = sampling.example_labels(6, (), model.num_classes)
  one = sampling.generate(batch_fn, model.params, sampling.make_mesh(jax.devices()[:1]), labels,
                          seed=0, batch_size=6, progress=False)
  mesh4 = sampling.make_mesh()
  assert mesh4.devices.size == 4
  # Batches of 4 over 4 devices: two calls, the second one padded with 2 dropped samples.
  four = sampling.generate(batch_fn, model.params, mesh4, labels, seed=0, batch_size=4,
                           progress=False)
  prefix = sampling.generate(batch_fn, model.params, mesh4, labels[:3], seed=0, batch_size=4,
                             progress=False)
  other_seed = sampling.generate(batch_fn, model.params, mesh4, labels, seed=1, batch_size=4,
                                 progress=False)
  assert one.shape == (6, *SHAPE) and one.dtype == np.uint8
  assert one.std() > 10  # Not a constant image.
  np.testing.assert_array_equal(one, four)
  np.testing.assert_array_equal(prefix, one[:3])
  assert np.mean(other_seed != one) > 0.5


def test_batch_fn_matches_explicit_keys_and_guidance(toy):
  """Re-derives x_T, the sampler keys and the guided model independently of sampling.py."""
  model, batch_fn = toy
  seed, indices, labels = 7, np.array([5, 0, 9], np.int32), np.array([2, 0, 1], np.int32)
  got = jax.jit(batch_fn)(model.params, sampling.seed_key_data(seed), indices, labels)

  @jax.jit
  def reference():
    keys = [jax.random.split(jax.random.fold_in(jax.random.key(seed), int(i))) for i in indices]
    x_T = jnp.stack([jax.random.normal(k[0], SHAPE) for k in keys])

    def guided(x, t):
      apply = lambda y: model.module.apply({"params": model.params}, x, t, y)
      cond, uncond = apply(jnp.asarray(labels)), apply(jnp.full((3,), 3))
      return uncond + 2.5 * (cond - uncond)

    return diffusion.sample(guided, model.schedule, x_T, jnp.stack([k[1] for k in keys]),
                            method="ddpm", num_steps=3)

  np.testing.assert_allclose(got, reference(), atol=1e-5)


def test_quantisation_order_and_padding():
  """A stub sampler that returns hand-picked values: 12 samples in batches of 5 on 4 devices."""
  values = np.array([-1.0, 1.0, 0.0, 0.999, -0.999, 1.7, -2.5, 0.5, -0.5, 0.25,
                     # (x + 1) * 127.5 is exactly 64.5 in float32 (64.500004 in float64):
                     # round half to even gives 64, rounding half up or float64 math 65.
                     -0.49411762, -1 + 1 / 127.5], np.float32)
  want = np.array([0, 255, 128, 255, 0, 255, 0, 191, 64, 159, 64, 1], np.uint8)

  def stub(params, key_data, indices, labels):
    del params, key_data
    return jnp.broadcast_to(jnp.asarray(values)[indices % 12][:, None, None, None] + 0 * labels[
        :, None, None, None], (indices.shape[0], 3, 2, 1))

  got = sampling.generate(stub, {}, sampling.make_mesh(), np.zeros(12, np.int32), seed=0,
                          batch_size=5, progress=False)
  assert got.shape == (12, 3, 2, 1) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[:, 0, 0, 0], want)
  np.testing.assert_array_equal(got, np.broadcast_to(want[:, None, None, None], got.shape))

  def nan_stub(params, key_data, indices, labels):
    return stub(params, key_data, indices, labels) * jnp.nan

  with pytest.raises(FloatingPointError, match="NaN"):
    sampling.generate(nan_stub, {}, sampling.make_mesh(), np.zeros(3, np.int32), seed=0,
                      batch_size=4, progress=False)


def test_example_labels():
  np.testing.assert_array_equal(sampling.example_labels(7, (), 3), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(sampling.example_labels(5, (4, 1), 10), [4, 1, 4, 1, 4])
  np.testing.assert_array_equal(sampling.example_labels(3, (), 0), [0, 0, 0])
  assert sample.parse_labels(" 3, 5,7") == (3, 5, 7) and sample.parse_labels("") == ()
  for bad in ("a,b", "-1"):
    with pytest.raises(sample.SampleInputError):
      sample.parse_labels(bad)


def test_npz_layout_and_animation_frames(tmp_path):
  samples = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
  path = str(tmp_path / "a" / "s.npz")
  sampling.write_npz(path, samples, np.array([4, 1]), {"method": "ddim", "seed": 3, "eta": 0.5})
  with np.load(path, allow_pickle=False) as data:
    assert sorted(data.files) == ["arr_0", "arr_1", "eta", "method", "seed"]
    np.testing.assert_array_equal(data["arr_0"], samples)
    assert data["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(data["arr_1"], [4, 1])
    assert str(data["method"]) == "ddim" and int(data["seed"]) == 3 and float(data["eta"]) == 0.5
  sampling.write_npz(path, samples, None, {})
  with np.load(path, allow_pickle=False) as data:
    assert data.files == ["arr_0"]

  # Trajectory of 2 images over 11 states, state k filled with the value 10 * k.
  trajectory = np.broadcast_to((10 * np.arange(11, dtype=np.uint8))[None, :, None, None, None],
                               (2, 11, 4, 4, 3))
  frames = sampling.animation_frames(trajectory, 3)
  assert [frame[2, 2, 0] for frame in frames] == [0, 50, 100]  # States 0, 5 and 10.
  assert frames[0].shape == (4 + 2 * 2, 2 * 4 + 3 * 2, 3)  # One row of 2 images, padding 2.
  assert len(sampling.animation_frames(trajectory, 50)) == 11


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


def test_bad_inputs_are_rejected_before_loading(tmp_path):
  settings = sampling.SamplerSettings
  cases = {
      "exactly one of --workdir": sample.SampleOptions(),
      "is not a directory": sample.SampleOptions(workdir=str(tmp_path / "missing")),
      "--method='dpm'": sample.SampleOptions(workdir=str(tmp_path),
                                             sampler=settings(method="dpm")),
      "--num_samples=0 must be > 0": sample.SampleOptions(workdir=str(tmp_path), num_samples=0),
      "--guidance_scale=-1": sample.SampleOptions(workdir=str(tmp_path),
                                                  sampler=settings(guidance_scale=-1.0)),
  }
  for message, options in cases.items():
    with pytest.raises(sample.SampleInputError, match=message.replace("[", r"\[")):
      sample.check_options(options)


def test_bad_inputs_are_rejected_against_the_model():
  schedule = diffusion.make_schedule("linear", 60)
  unconditional = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE)
  no_null = sampling.DiffusionModel(None, {}, schedule, "eps", SHAPE, num_classes=3)
  cases = [
      (unconditional, sample.SampleOptions(labels=(1,)), "model is unconditional"),
      (unconditional, sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=2.0)),
       "needs a class-conditional model"),
      (no_null, sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=2.0)),
       "trained with label dropout"),
      (no_null, sample.SampleOptions(labels=(0, 3)), r"--labels \[3\] out of range"),
      (no_null, sample.SampleOptions(sampler=sampling.SamplerSettings(num_steps=61)),
       "exceeds the model's 60 diffusion timesteps"),
  ]
  for model, options, message in cases:
    with pytest.raises(sample.SampleInputError, match=message):
      sample.check_against_model(options, model)
  # Guidance scale 1 is the conditional model: no null label needed.
  sample.check_against_model(
      sample.SampleOptions(sampler=sampling.SamplerSettings(guidance_scale=1.0)), no_null)


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
