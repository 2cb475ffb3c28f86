"""jaxdiff.train.loop: the pieces of the loop (resume, SIGTERM, NaN and end-to-end runs are in
test_checkpoint.py and test_train_cli.py)."""

import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

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


@pytest.mark.slow  # 30 s: trains an autoencoder, caches latents, trains on them
def test_trains_on_latents_cached_by_the_encoder(tmp_path):
  """The offline latent path end to end: images -> encode (a tiny random diffusers
  AutoencoderKL folder) -> a DiT trained on the 8x8x4 latents by the real loop, the encoder never
  in the step; the preview is decoded to 16x16x3 images by that folder's decoder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import latent_runs  # pylint: disable=g-import-not-at-top
  workdir, _, state = latent_runs.make_latent_run(tmp_path, sample_every=2)
  patch_kernel = state.params["patch_embed"]["kernel"]
  assert patch_kernel.shape[2] == 4  # the DiT sees 4 latent channels, not 3 image channels
  assert int(state.step) == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000002.png")))
  assert grid.shape == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2, 3)  # 4 decoded RGB images
