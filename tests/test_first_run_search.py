"""Tests of experiments/first_run/search.py: a variant is trained and sampled by the real
commands, sampled again with another sampler on the same run, scored, and not rerun."""
import glob
import json
import os

from absl import flags
import numpy as np
import pytest

from experiments.first_run import search


@pytest.mark.slow  # trains the digit scorer (about a minute) and a 2-step run, samples twice
def test_a_variant_is_trained_sampled_scored_and_resumed(tmp_path, monkeypatch):
  monkeypatch.setattr(search, "VARIANTS", {"tiny": ("a 2-step U-Net", {
      "model.name": "unet-tiny", "model.overrides.channels": 8, "train.num_steps": 2,
      "train.batch_size": 8, "train.sample_every": 0, "checkpoint.every_steps": 2,
      "sample.method": "ddim", "sample.num_steps": 3})})
  out, root = str(tmp_path / "rows.jsonl"), str(tmp_path / "runs")
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["search", f"--runs={root}", f"--rows={out}", "--num_samples=12",
               f"--scorer_cache={tmp_path / 'cache'}",
               "--variants=tiny,tiny@ddim10eta1"])
  try:
    search.main([])
    with open(out) as f:
      rows = [json.loads(line) for line in f]
    assert [row["variant"] for row in rows] == ["tiny", "tiny@ddim10eta1"]
    assert rows[0]["train_s"] == rows[1]["train_s"] > 0
    assert all(row["num_samples"] == 12 and 0 <= row["class_coverage"] <= 1 for row in rows)
    # Without sampler flags the sample command uses the run's own config.sample (ddim, 3 steps).
    with np.load(glob.glob(os.path.join(root, "tiny", "scored_tiny", "*.npz"))[0]) as data:
      assert (str(data["method"]), int(data["num_steps"]), float(data["eta"])) == ("ddim", 3, 0)
      assert data["arr_0"].shape == (12, 32, 32, 1)
    with np.load(glob.glob(os.path.join(root, "tiny", "scored_tiny@ddim10eta1", "*.npz"))[0]
                 ) as data:
      assert (str(data["method"]), int(data["num_steps"]), float(data["eta"])) == ("ddim", 10, 1)
    search.main([])  # both rows exist: nothing is trained or sampled again
    with open(out) as f:
      assert len(f.readlines()) == 2
  finally:
    flags.FLAGS.unparse_flags()


def test_flags_of_a_variant():
  assert search._flag("train.num_steps", 600) == "--config.train.num_steps=600"  # pylint: disable=protected-access
  assert search._flag("model.overrides.attention_levels", (2,)) == (  # pylint: disable=protected-access
      "--config.model.overrides.attention_levels=(2,)")
