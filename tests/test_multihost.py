"""Two processes on 127.0.0.1 (jax.distributed + gloo) train together through the real CLI and
agree with a single-process run of the same config (losses and final params)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from jaxdiff.train import checkpoint, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = {"data.image_size": 8, "train.num_steps": 2, "train.log_every": 1,
             "train.sample_every": 0, "checkpoint.every_steps": 2}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.slow  # a minute: two processes over gloo plus the one-process reference
def test_two_processes_match_one(tmp_path):
  workdir = str(tmp_path / "two")
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  args = ["--config=configs/base.py:tiny", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  processes = [subprocess.Popen([sys.executable, "-m", "jaxdiff.train", *args, f"--process_id={i}"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    # The single-process reference runs here meanwhile, on one of this process's devices.
    config = base.get_config("tiny")
    for dotted, value in OVERRIDES.items():
      section, field = dotted.split(".")
      config[section][field] = value
    reference_dir = str(tmp_path / "one")
    reference = loop.train(config, reference_dir, devices=jax.devices()[:1])
    outputs = [p.communicate(timeout=400) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]

  two, one = losses(workdir), losses(reference_dir)
  assert sorted(two) == sorted(one) == [1, 2]
  np.testing.assert_allclose([two[s] for s in (1, 2)], [one[s] for s in (1, 2)], atol=1e-5)
  _, _, params, ema = checkpoint.restore_for_inference(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               params, reference.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               ema[0.9], reference.ema_params["ema_0p9"])
