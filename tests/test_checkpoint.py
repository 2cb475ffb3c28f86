"""Tests for jaxdiff.train.checkpoint and resuming through jaxdiff.train.loop.train.

References: an uninterrupted run (bitwise on CPU), the saved arrays themselves (restore on another
device count), and the files on disk before and after a refused restore.
"""

import asyncio
import hashlib
import os
import signal
import sys
import types

import jax
import numpy as np
import pytest

from configs import base
from jaxdiff.train import builder, checkpoint, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_steps=4, **overrides):
  """dit-tiny on 8x8 offline MNIST, checkpoints every 2 steps, no sample grids."""
  config = base.get_config("tiny")
  config.data.image_size = 8
  config.train.num_steps = num_steps
  config.train.sample_every = 0
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = 5
  config.mesh.fsdp_min_size = 1
  for dotted, value in overrides.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_bitwise_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


class _SigtermAfter:
  """Wraps the data iterator: sends SIGTERM to this process when batch `n` is requested."""

  def __init__(self, iterator, n):
    self._iterator, self._n, self._count = iterator, n, 0

  def __next__(self):
    self._count += 1
    if self._count == self._n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._iterator)

  def __getattr__(self, name):
    return getattr(self._iterator, name)


def straight_and_resumed(make_config, tmp_path_factory):
  """A straight run of `make_config()`, and the same run stopped by SIGTERM and run again."""
  straight_dir = str(tmp_path_factory.mktemp("straight"))
  straight = host(loop.train(make_config(), straight_dir, devices=jax.devices()[:1]))
  resumed_dir = str(tmp_path_factory.mktemp("resumed"))
  original = loop.make_train_iterator
  loop.make_train_iterator = lambda *a, **k: _SigtermAfter(original(*a, **k), 2)
  try:
    with pytest.raises(loop.Preempted) as preempted:
      loop.train(make_config(), resumed_dir, devices=jax.devices()[:1])
  finally:
    loop.make_train_iterator = original
  steps_at_stop = checkpoint.open_manager(resumed_dir, read_only=True).all_steps()
  resumed = host(loop.train(make_config(), resumed_dir, devices=jax.devices()[:1]))
  return dict(straight=straight, straight_dir=straight_dir, resumed=resumed,
              resumed_dir=resumed_dir, preempted_at=preempted.value.step,
              steps_at_stop=list(steps_at_stop))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight 4-step run, and the same command stopped by SIGTERM and run again."""
  return straight_and_resumed(tiny_config, tmp_path_factory)


def autoencoder_config():
  """configs/mnist_autoencoder.py:tiny (kl-tiny on 16x16 digits), 4 steps, no previews."""
  from configs import mnist_autoencoder  # pylint: disable=g-import-not-at-top
  config = mnist_autoencoder.get_config("tiny")
  config.train.num_steps = 4
  config.train.sample_every = 0
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = 5
  return config


@pytest.mark.slow  # three in-process autoencoder runs: about 80 s on 2 loaded cores
def test_autoencoder_run_resumes_bitwise(tmp_path_factory, runs):
  """task=autoencoder goes through the same state, checkpoints and resume as diffusion."""
  ae = straight_and_resumed(autoencoder_config, tmp_path_factory)
  assert ae["preempted_at"] == 2 and ae["steps_at_stop"] == [2]
  assert int(ae["resumed"].step) == 4
  for part in ("params", "ema_params", "opt_state"):
    assert_bitwise_equal(getattr(ae["resumed"], part), getattr(ae["straight"], part))
  assert "quant_conv" in ae["straight"].params  # an AutoencoderKL, not a denoiser

  # Loading it as the autoencoder of a latent run: EMA params, the latents' scale.
  module, params = checkpoint.load_autoencoder(ae["straight_dir"])
  assert_bitwise_equal(params, ae["straight"].ema_params["ema_0p9"])
  latents = {"latent_shape": [8, 8, 4], "scaling_factor": 0.5, "shift_factor": 0.25}
  scaled, _ = checkpoint.load_latent_autoencoder(ae["straight_dir"], latents)
  assert (scaled.scaling_factor, scaled.shift_factor, scaled.latent_channels) == (0.5, 0.25, 4)
  assert module.scaling_factor == 1.0
  with pytest.raises(checkpoint.CheckpointError, match="3 channels"):
    checkpoint.load_latent_autoencoder(ae["straight_dir"], {**latents, "latent_shape": [8, 8, 3]})
  with pytest.raises(checkpoint.CheckpointError, match="is a diffusion run"):
    checkpoint.load_autoencoder(runs["straight_dir"])
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_autoencoder(ae["straight_dir"] + "_nope")


def test_sigterm_saves_and_rerun_resumes_bitwise(runs):
  # SIGTERM arrived while step 2's batch was read: the loop finished step 2, saved it, stopped.
  assert runs["preempted_at"] == 2 and runs["steps_at_stop"] == [2]
  assert int(runs["resumed"].step) == int(runs["straight"].step) == 4
  assert_bitwise_equal(runs["resumed"].params, runs["straight"].params)
  assert_bitwise_equal(runs["resumed"].ema_params, runs["straight"].ema_params)
  assert_bitwise_equal(runs["resumed"].opt_state, runs["straight"].opt_state)
  with open(os.path.join(runs["resumed_dir"], "metrics.jsonl"), encoding="utf-8") as f:
    import json  # pylint: disable=g-import-not-at-top
    losses = {row["step"]: row["train/loss"] for row in map(json.loads, f) if "train/loss" in row}
  with open(os.path.join(runs["straight_dir"], "metrics.jsonl"), encoding="utf-8") as f:
    straight = {row["step"]: row["train/loss"] for row in map(json.loads, f) if "train/loss" in row}
  assert losses == straight and sorted(losses) == [2, 4]


@pytest.mark.parametrize("save_devices, restore_devices, fsdp", [(4, 1, 1), (1, 4, 2)])
def test_restore_onto_another_device_count(runs, save_devices, restore_devices, fsdp):
  # The straight run was saved on 1 device; re-save its final state on `save_devices` first.
  config = tiny_config(mesh__fsdp=fsdp)
  source = runs["straight_dir"]
  if save_devices == 4:
    run4 = builder.build_run(tiny_config(mesh__fsdp=2), devices=jax.devices())
    manager = checkpoint.open_manager(source, read_only=True)
    state, data = checkpoint.restore(manager, 4, run4.abstract_state, None)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
    resolved = checkpoint.resolved_config(tiny_config(mesh__fsdp=2), run4.config, run4.info)
    target = os.path.join(source, "..", "saved_on_4")
    writer = checkpoint.open_manager(target, run4.config.checkpoint)
    checkpoint.save(writer, 4, state, data, resolved)
    writer.wait_until_finished()
    writer.close()
    source = target
  run = builder.build_run(config, devices=jax.devices()[:restore_devices])
  resolved = checkpoint.resolved_config(config, run.config, run.info)
  manager = checkpoint.open_manager(source, read_only=True)
  restored, data = checkpoint.restore(manager, 4, run.abstract_state, resolved)
  assert data["next_batch"] == 4
  assert {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set} == set(
      jax.devices()[:restore_devices])
  if fsdp == 2:
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(restored.opt_state))
  assert_bitwise_equal(restored, runs["straight"])


def test_incompatible_checkpoint_is_refused_naming_the_fields(runs):
  config = tiny_config(model__class_conditional=True)
  config.model.overrides.hidden_size = 48
  run = builder.build_run(config, devices=jax.devices()[:1])
  resolved = checkpoint.resolved_config(config, run.config, run.info)
  manager = checkpoint.open_manager(runs["straight_dir"], read_only=True)
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore(manager, 4, run.abstract_state, resolved)
  message = str(error.value)
  assert "model.class_conditional" in message and "model.overrides.hidden_size" in message
  assert "\n" not in message


def _digest(directory):
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_corrupted_latest_checkpoint_is_refused_and_left_untouched(runs, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(runs["straight_dir"], workdir)
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if "ocdbt" in root or name.startswith("manifest"):
        with open(os.path.join(root, name), "r+b") as f:
          f.write(b"\0garbage\0" * 8)
  before = _digest(workdir)
  with pytest.raises(checkpoint.CheckpointError) as error:
    loop.train(tiny_config(num_steps=6), workdir, devices=jax.devices()[:1])
  message = str(error.value)
  assert "checkpoint step 4" in message and "resume from step 2" in message
  assert "\n" not in message
  assert _digest(workdir) == before


def test_restore_for_inference(runs):
  config, model, params, ema = checkpoint.restore_for_inference(runs["straight_dir"])
  assert config.model.name == "dit-tiny" and model.patch_size == 2
  assert config.data.channels == 1 and config.data.image_size == 8
  assert_bitwise_equal(params, runs["straight"].params)
  assert sorted(ema) == [0.9, 0.99]
  assert_bitwise_equal(ema[0.9], runs["straight"].ema_params["ema_0p9"])
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at step 3"):
    checkpoint.restore_for_inference(runs["straight_dir"], step=3)


def test_only_closed_loop_reports_of_abandoned_writes_are_dropped(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_abandoned_writes()  # pylint: disable=protected-access
  checkpoint._quiet_abandoned_writes()  # installing twice wraps once
  closed = asyncio.new_event_loop()
  closed.close()

  def report(call):
    try:
      call()
    except Exception as error:  # pylint: disable=broad-exception-caught
      sys.unraisablehook(types.SimpleNamespace(
          exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__,
          err_msg=None, object=None))

  report(lambda: closed.call_soon_threadsafe(print))  # TensorStore's callback after the failure
  assert not seen
  report(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))  # not asyncio's
  report(lambda: 1 / 0)
  assert [type(u.exc_value) for u in seen] == [RuntimeError, ZeroDivisionError]


def test_a_save_broken_by_a_dead_peer_says_so_and_names_the_intact_step(tmp_path, monkeypatch):
  import types  # pylint: disable=import-outside-toplevel
  (tmp_path / "2").mkdir()
  manager = types.SimpleNamespace(directory=str(tmp_path))
  gloo = ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error "
                    "[127.0.0.1]:42896: Connection reset by peer")
  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
  message = str(checkpoint._save_failed(manager, 4, gloo))  # pylint: disable=protected-access
  assert "step 4" in message and "checkpoint step 2 is intact" in message
  assert "another task died" in message and "restart every process" in message
  full = OSError(28, "No space left on device")
  message = str(checkpoint._save_failed(manager, 4, full))  # pylint: disable=protected-access
  assert "free space" in message and "another task died" not in message
  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 1)
  message = str(checkpoint._save_failed(manager, 4, gloo))  # pylint: disable=protected-access
  assert "free space" in message  # one process has no peer to lose


def test_tuple_overrides_survive_the_json_round_trip_of_a_resume():
  """The signature is saved as JSON, where tuples come back as lists: a run with tuple-valued
  model overrides (the offline default's channel_mult) must still resume."""
  import json  # pylint: disable=import-outside-toplevel
  from configs import mnist_offline  # pylint: disable=import-outside-toplevel
  from jaxdiff import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxdiff.data import DatasetInfo  # pylint: disable=import-outside-toplevel
  config = config_lib.parse_config(mnist_offline.get_config())
  assert config.model.overrides["channel_mult"] == (1, 2, 2)
  info = DatasetInfo(image_size=32, channels=1, num_classes=10, num_examples=5000)
  current = {"signature": checkpoint.model_signature(config, info)}
  saved = json.loads(json.dumps(current))
  checkpoint.check_compatible(saved, current, "step 8")  # raises on any difference
  other = dict(saved, signature=dict(saved["signature"], **{
      "model.overrides.channel_mult": [1, 2]}))
  with pytest.raises(checkpoint.CheckpointError, match="channel_mult"):
    checkpoint.check_compatible(other, current, "step 8")
