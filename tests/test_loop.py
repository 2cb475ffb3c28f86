"""jaxdiff.train.loop: the pieces of the loop (resume, SIGTERM, NaN and end-to-end runs are in
test_checkpoint.py and test_train_cli.py)."""

import os
import signal
import threading
import time

import jax
import numpy as np

from jaxdiff.train import loop
from jaxdiff.train import sharding as sharding_lib


def test_next_batches_stacks_k_local_batches_into_global_arrays():
  mesh = sharding_lib.make_mesh(2)
  batches = iter([{"image": np.full((8, 2, 2, 1), i, np.float32), "label": np.arange(8) + i,
                   "ignored": np.zeros(1)} for i in range(3)])
  got = loop.next_batches(batches, 2, sharding_lib.batch_sharding(mesh, leading_dims=1))
  assert sorted(got) == ["image", "label"]
  assert got["image"].shape == (2, 8, 2, 2, 1)
  np.testing.assert_array_equal(np.asarray(got["image"])[:, 0, 0, 0, 0], [0, 1])
  np.testing.assert_array_equal(np.asarray(got["label"]), [np.arange(8), np.arange(8) + 1])
  assert got["label"].sharding.spec == sharding_lib.batch_sharding(mesh, 1).spec
  assert next(batches)["image"][0, 0, 0, 0] == 2  # exactly k batches were read


def test_timer_leaves_out_paused_time():
  timer = loop._Timer(10)  # pylint: disable=protected-access
  with timer.paused():
    time.sleep(0.3)
  rate = timer.steps_per_second(12)
  assert rate > 2 / 0.25  # the 0.3 s pause is not counted


def test_preemption_guard_notices_sigterm_and_restores_the_handler():
  # The handler is installed from the main thread only; anywhere else SIGTERM would kill us.
  assert threading.current_thread() is threading.main_thread()
  previous = signal.getsignal(signal.SIGTERM)
  guard = loop.PreemptionGuard(manager=None)
  assert not guard.should_stop(0)
  os.kill(os.getpid(), signal.SIGTERM)
  assert guard.should_stop(1)
  guard.close()
  assert signal.getsignal(signal.SIGTERM) == previous
  assert jax.process_count() == 1


def test_next_batches_feeds_cached_latents_as_the_data():
  mesh = sharding_lib.make_mesh(1, jax.devices()[:1])
  batches = iter([{"latent": np.full((2, 4, 4, 4), 7.0, np.float32), "label": np.arange(2)}])
  got = loop.next_batches(batches, 1, sharding_lib.batch_sharding(mesh, leading_dims=1))
  assert sorted(got) == ["image", "label"] and got["image"].shape == (1, 2, 4, 4, 4)
  assert float(np.asarray(got["image"]).max()) == 7.0


def test_trains_on_latents_cached_by_the_encoder(tmp_path):
  """The offline latent path end to end: images -> encode (a tiny random diffusers
  AutoencoderKL folder) -> a DiT trained on the 8x8x4 latents by the real loop, the encoder never
  in the step; the preview is decoded to 16x16x3 images by that folder's decoder."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from jaxdiff import convert, data  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import encode  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    (tmp_path / "images" / label).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
          tmp_path / "images" / label / f"{i}.png")
  torch.manual_seed(0)
  AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4,
                scaling_factor=0.5).save_pretrained(tmp_path / "vae")
  module, params = convert.load_diffusers(str(tmp_path / "vae"))
  cfg = data.DataConfig(source="folder", folder=str(tmp_path / "images"), image_size=16,
                        num_threads=0)
  encode.encode_dataset(cfg, module, params, str(tmp_path / "latents"), batch_size=8)
  config = base.get_config("tiny")
  config.data.source = "latents"
  config.data.latents_dir = str(tmp_path / "latents")
  config.autoencoder.path = str(tmp_path / "vae")
  config.model.class_conditional = True
  config.train.num_steps = 2
  config.train.sample_every = 2
  config.sample.num_steps = 2
  config.sample.clip_denoised = False
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  state = loop.train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  patch_kernel = state.params["patch_embed"]["kernel"]
  assert patch_kernel.shape[2] == 4  # the DiT sees 4 latent channels, not 3 image channels
  assert int(state.step) == 2
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
  grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000002.png"))
  assert grid.shape == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2, 3)  # 4 decoded RGB images
