"""Crash anywhere, lose nothing: SIGKILL at any moment, a full disk, corrupt data, a dead peer,
non-finite losses and bad input, each against the real training/sampling/evaluation code.

References: an uninterrupted run of the same command (bitwise: params, EMA, optimizer state, step
and data position), the files on disk before and after, and the bad records themselves. The
subprocess harness is tests/fault_harness.py; the bad-input table is tests/bad_inputs.py.
"""

import dataclasses
import gzip
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import bad_inputs
import fault_harness as harness
from jaxdiff import data
from jaxdiff.diffusion import make_schedule
from jaxdiff.data import pipeline, sources
from jaxdiff.train import checkpoint, loop
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import step as step_lib

sys.path.insert(0, harness.REPO)
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position

QUICK = ["--config.train.num_steps=4"]  # the default run's trials: 4 steps, saves at 2 and 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _one_line_error(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------------- SIGKILL
@pytest.fixture(scope="module")
def quick_kill(tmp_path_factory, cache_dir):
  """A 4-step reference run and, alongside, the same run SIGKILLed inside the background save of
  step 2 (its files written, the temporary directory not yet renamed); then the rerun."""
  import subprocess  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("quick_kill")
  reference = subprocess.Popen(harness.command(str(root / "reference"), QUICK), cwd=harness.REPO,
                               env=harness.env(cache_dir=cache_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
  trial = harness.kill_trial(str(root / "killed"), "finalize:2", extra=QUICK, cache_dir=cache_dir)
  _, stderr = reference.communicate(timeout=900)
  assert reference.returncode == 0, stderr[-3000:]
  return root, trial


@pytest.mark.slow  # a minute; the slow step's twelve SIGKILL trials include this case too
def test_sigkill_during_async_save_resumes_bitwise(quick_kill):
  root, trial = quick_kill
  assert trial.killed_status == -9
  # Killed with step 2 half written: only Orbax's temporary directory was there, not a step.
  assert trial.steps_saved_at_kill == [] and trial.leftovers_at_kill
  assert trial.resume_status == 0, trial.resume_stderr
  assert harness.leftovers(str(root / "killed")) == []  # the temporary was cleaned up
  assert harness.final_digest(str(root / "killed"), 4) == harness.final_digest(
      str(root / "reference"), 4)


@pytest.fixture(scope="module")
def reference_8(tmp_path_factory, cache_dir):
  """The uninterrupted 8-step run (saves at 2, 4, 6, 8) of the slow trials."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  status, stderr, seconds = harness.run(workdir, cache_dir=cache_dir)
  assert status == 0, stderr[-3000:]
  return harness.final_digest(workdir), seconds


SLOW_FAULTS = harness.random_faults(12, seed=13, run_seconds=30.0)


@pytest.mark.slow
@pytest.mark.parametrize("fault, kill_at", SLOW_FAULTS,
                         ids=[f or f"external_{t:.1f}s" for f, t in SLOW_FAULTS])
def test_sigkill_anywhere_resumes_bitwise(reference_8, cache_dir, tmp_path, fault, kill_at):
  digest, _ = reference_8
  workdir = str(tmp_path / "run")
  trial = harness.kill_trial(workdir, fault, kill_at, cache_dir=cache_dir)
  assert trial.resume_status == 0, trial.resume_stderr
  assert harness.leftovers(workdir) == []
  assert harness.final_digest(workdir) == digest


# --------------------------------------------------------------------------------- disk full
@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(reference_8, cache_dir, tmp_path):
  mount = str(tmp_path / "small_disk")
  if not harness.try_mount_tmpfs(mount, "7m"):
    pytest.skip("mounting a tmpfs is not permitted here; test_disk_full_injected covers ENOSPC")
  try:
    workdir = os.path.join(mount, "run")
    status, stderr, _ = harness.run(workdir, cache_dir=cache_dir)
    line = _one_line_error(stderr)
    assert status == 2 and "saving checkpoint step" in line and "is intact" in line
    intact = harness.checkpoint_steps(workdir)
    assert intact and f"checkpoint step {max(intact)} is intact" in line
    for step in intact:  # every finished step still loads
      checkpoint.restore_for_inference(workdir, step)
    harness.resize_tmpfs(mount, "64m")
    status, stderr, _ = harness.run(workdir, cache_dir=cache_dir)
    assert status == 0, stderr[-3000:]
    assert harness.leftovers(workdir) == []
    assert harness.final_digest(workdir) == reference_8[0]
  finally:
    harness.unmount(mount)


@pytest.mark.slow
def test_disk_full_injected(reference_8, cache_dir, tmp_path):
  """The save of step 4 fails with ENOSPC in its background write (any machine, no mount)."""
  workdir = str(tmp_path / "run")
  status, stderr, _ = harness.run(workdir, fault="enospc:4", cache_dir=cache_dir)
  line = _one_line_error(stderr)
  assert status == 2 and "No space left on device" in line
  assert "saving checkpoint step 4" in line and "checkpoint step 2 is intact" in line
  assert harness.checkpoint_steps(workdir) == [2]
  checkpoint.restore_for_inference(workdir, 2)
  status, stderr, _ = harness.run(workdir, cache_dir=cache_dir)
  assert status == 0, stderr[-3000:]
  assert harness.final_digest(workdir) == reference_8[0]


# ------------------------------------------------------------------------------ corrupt data
def _image_folder(root, extension):
  os.makedirs(os.path.join(root, "a"))
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), 30 * i + 10, np.uint8)).save(
        os.path.join(root, "a", f"{i}{extension}"))
  bad = os.path.join(root, "a", f"3{extension}")
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:len(raw) // 2])
  return bad


def _batches(cfg, n=3):
  iterator = data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)
  try:
    return [next(iterator) for _ in range(n)], iterator.skipped_records
  finally:
    iterator.close()


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_truncated_image_is_named_or_skipped_and_counted(tmp_path, extension):
  bad = _image_folder(str(tmp_path), extension)
  cfg = data.DataConfig(source="folder", folder=str(tmp_path), image_size=8, num_threads=1,
                        prefetch=1)
  with pytest.raises(data.BadRecordError) as error:
    _batches(cfg)
  assert f"image file {bad} cannot be decoded" in str(error.value)
  assert "\n" not in str(error.value)
  skipping = dataclasses.replace(cfg, skip_bad_records=True)
  batches, skipped = _batches(skipping)
  assert skipped >= 2  # 3 batches of 4 from 6 files: two epochs, the bad file in each
  values = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  bad_value = np.float32(30 * 3 + 10) / np.float32(127.5) - 1
  assert np.all(np.abs(values - bad_value) > 0.05)  # never the bad image, never a hole
  again, _ = _batches(skipping)  # the replacement depends on the position only
  np.testing.assert_array_equal(np.stack([b["image"] for b in again]),
                                np.stack([b["image"] for b in batches]))


def test_malformed_digit_row_is_named_or_dropped_and_counted(tmp_path, monkeypatch):
  with gzip.open(sources.mnist_offline_path(), "rt") as f:
    lines = f.readlines()
  lines[41] = lines[41].replace(",", ";", 3)
  path = str(tmp_path / "mnist_5k.csv.gz")
  with gzip.open(path, "wt") as f:
    f.writelines(lines)
  with pytest.raises(data.BadRecordError, match=f"{path} line 42 is not 784 pixels"):
    sources.load_mnist_offline(path)
  images, labels, skipped = sources.load_mnist_offline(path, True)
  intact_images, intact_labels, _ = sources.load_mnist_offline(sources.mnist_offline_path())
  assert skipped == 1 and len(labels) == 4999
  np.testing.assert_array_equal(images, np.delete(intact_images, 41, axis=0))
  np.testing.assert_array_equal(labels, np.delete(intact_labels, 41))
  monkeypatch.setattr(sources, "mnist_offline_path", lambda: path)
  cfg = data.DataConfig(source="mnist_offline", image_size=28, skip_bad_records=True)
  iterator = data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0,
                                      process_count=1)
  assert iterator.skipped_records == 1 and iterator.stats() == {"data/skipped_records": 1.0}


def test_arrayrecord_shard_cut_short_is_named(tmp_path):
  import tfds_digits  # pylint: disable=g-import-not-at-top  (registers the 20-digit TFDS builder)
  del tfds_digits
  data_dir = str(tmp_path / "tfds")
  prepared = sources.prepare_tfds("jaxdiff_test_digits", data_dir)
  shard = [os.path.join(prepared, f) for f in os.listdir(prepared) if "train.array_record" in f]
  assert len(shard) == 1
  with open(shard[0], "rb") as f:
    raw = f.read()
  with open(shard[0], "wb") as f:
    f.write(raw[:len(raw) // 2])
  cfg = data.DataConfig(source="tfds", name="jaxdiff_test_digits", data_dir=data_dir,
                        image_size=28, download=False)
  with pytest.raises((data.BadRecordError, data.DatasetNotFoundError)) as error:
    _batches(cfg, 1)
  assert shard[0] in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------- non-finite loss
def _tiny_config(num_steps=4, **train):
  config = base.get_config("tiny")
  config.data.image_size = 8
  config.train.num_steps = num_steps
  config.train.sample_every = 0
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  for field, value in train.items():
    config.train[field] = value
  return config


def _linear_model(variables, x, t, y, train, rngs):
  """A stand-in network (eps = w * x + b): the step's skip logic does not depend on the model,
  and this compiles in a fraction of a second."""
  del t, y, train, rngs
  return variables["params"]["w"] * x + variables["params"]["b"]


def test_step_skips_a_nonfinite_update_and_counts_it():
  from jaxdiff.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxdiff.config import parse_config  # pylint: disable=g-import-not-at-top
  config = parse_config(_tiny_config())
  tx, lr_schedule = state_lib.make_optimizer(
      dataclasses.replace(config.optimizer, warmup_steps=0), 10)
  init = lambda key: {"w": jnp.ones(()), "b": jnp.zeros((1,))}
  state = state_lib.create_state(init, tx, (0.9,), jax.random.key(0))
  step = jax.jit(lambda s, b: step_lib.train_step(
      s, b, jax.random.key(1), apply_fn=_linear_model, tx=tx, lr_schedule=lr_schedule,
      schedule=make_schedule("linear", 100), diffusion=config.diffusion, conditional=False,
      learn_sigma=False, ema_decays=(0.9,), skip_nonfinite=True))
  good = {"image": jnp.linspace(-1, 1, 2 * 4 * 4).reshape(2, 4, 4, 1),
          "label": jnp.zeros((2,), jnp.int32)}
  poisoned = {**good, "image": good["image"].at[1, 2, 3, 0].set(jnp.nan)}
  before = jax.device_get(state)
  skipped_state, skipped_metrics = step(state, poisoned)
  assert float(skipped_metrics["train/skipped_update"]) == 1.0
  assert not np.isfinite(float(skipped_metrics["train/loss"]))
  assert int(skipped_state.step) == int(before.step) + 1
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(skipped_state, name)),
                 getattr(before, name))
  updated, good_metrics = step(skipped_state, good)
  assert float(good_metrics["train/skipped_update"]) == 0.0
  assert float(jax.device_get(updated.params["w"])) != 1.0
  assert np.all(np.isfinite(jax.device_get(updated.params["b"])))


def test_history_counts_skipped_steps_and_averages_the_rest():
  history = metrics_lib.History()
  names = ("train/loss", "train/grad_norm") + tuple(
      f"train/loss_q{q}_{k}" for q in range(4) for k in ("sum", "count"))
  values = {name: np.array([1.0, np.nan, 3.0]) for name in names}
  values["train/skipped_update"] = np.array([0.0, 1.0, 0.0])
  history.add(0, values)
  out = history.flush()
  assert out["train/skipped_updates"] == 1.0 and out["train/loss"] == 2.0
  assert out["train/loss_q0"] == 1.0  # (1 + 3) / (1 + 3)
  history.add(3, {**values, "train/skipped_update": np.zeros(3)})
  with pytest.raises(metrics_lib.NonFiniteLossError) as error:
    history.flush()
  assert error.value.step == 5


@pytest.mark.slow
def test_poisoned_batch_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setenv(pipeline.POISON_BATCH_ENV, "2")  # the batch of step 3
  with pytest.raises(loop.TrainingError) as error:
    loop.train(_tiny_config(), str(tmp_path), devices=jax.devices()[:1])
  message = str(error.value)
  assert "loss became NaN/Inf at step 3" in message and "last good checkpoint is step 2" in message
  assert harness.checkpoint_steps(str(tmp_path)) == [2]


@pytest.mark.slow
def test_poisoned_batch_is_skipped_counted_and_logged_with_the_opt_in(tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(pipeline.POISON_BATCH_ENV, "2")
  state = loop.train(_tiny_config(skip_nonfinite_updates=True), str(tmp_path),
                     devices=jax.devices()[:1])
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}
  assert rows[2]["train/skipped_updates"] == 0 and rows[4]["train/skipped_updates"] == 1
  assert np.isfinite(rows[4]["train/loss"])  # the mean of the step that was not skipped


# --------------------------------------------------------------------------------- dead peer
@pytest.mark.slow
def test_dead_peer_stops_the_survivor_in_bounded_time_and_both_resume(tmp_path, cache_dir):
  workdir = str(tmp_path / "pair")
  result = harness.dead_peer_trial(workdir, ["--config.train.num_steps=12"], heartbeat=10,
                                   cache_dir=cache_dir)
  assert result["steps_at_kill"], result
  assert result["survivor_status"] != 0
  assert result["survivor_seconds"] < 120, result["survivor_seconds"]
  assert "another task died" in result["survivor_stderr"] or "heartbeat" in result[
      "survivor_stderr"], result["survivor_stderr"][-3000:]
  assert result["restart_statuses"] == [0, 0], result
  assert max(result["final_steps"]) == 12


# -------------------------------------------------------------------------------- bad inputs
FAST_CASES = [c for c in bad_inputs.CASES if not c[4] and c[1] != "train" or c[0] in (
    "train/unknown override", "train/no --config", "train/no --workdir",
    "train/missing config file", "train/unknown variant", "train/override of the wrong type")]
SLOW_CASES = [c for c in bad_inputs.CASES if c not in FAST_CASES]


def _marks(case):
  del case  # every command follows jaxdiff/cli.py: one line, exit 2
  return []


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
  cache = {}

  def results(slow: bool):
    if slow not in cache:
      root = str(tmp_path_factory.mktemp("sandbox"))
      bad_inputs.make_sandbox(root)
      if slow:
        bad_inputs.make_checkpoints(root)
      work = str(tmp_path_factory.mktemp("drivers"))
      cache[slow] = root, bad_inputs.run_cases(SLOW_CASES if slow else FAST_CASES, root, work)
    return cache[slow]
  return results


def _check_bad_input(case, root, result):
  name, _, _, expected, _ = case
  lines = result["stderr"].strip().splitlines()
  assert len(lines) == 1 and "error: " in lines[0], result["stderr"][-3000:]
  assert expected in lines[0], lines[0]
  assert result["unchanged"], f"{name} changed files under {root}"
  assert result["status"] == 2, lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=_marks(c)) for c in FAST_CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(bad_input_results, case):
  root, results = bad_input_results(slow=False)
  _check_bad_input(case, root, results[case[0]])


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=_marks(c)) for c in SLOW_CASES])
def test_bad_input_with_checkpoints_and_data_is_one_line_exit_2(bad_input_results, case):
  root, results = bad_input_results(slow=True)
  _check_bad_input(case, root, results[case[0]])
