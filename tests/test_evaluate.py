"""The `python -m jaxdiff.evaluate` CLI: end to end on tiny files, and its input errors."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import fidelity_reference
from jaxdiff import cli, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hashed_weights(tmp_path_factory):
  """The random Inception under a torch-hub style name carrying its own sha256 prefix."""
  source = fidelity_reference.random_inception_path()
  digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
  path = tmp_path_factory.mktemp("weights") / f"weights-inception-random-{digest[:8]}.pth"
  shutil.copy(source, path)
  return str(path)


def _images(seed, n, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "jaxdiff.evaluate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 50 s: the whole evaluate CLI with Inception features
def test_end_to_end_json_table_and_proxy_label(tmp_path, hashed_weights):
  samples, ref_images = _images(0, 10), _images(1, 10)
  samples_path, ref_path = tmp_path / "samples_ddim50.npz", tmp_path / "ref.npz"
  np.savez(samples_path, arr_0=samples, method=np.array("ddim"), num_steps=np.array(50),
           guidance_scale=np.array(2.0), seed=np.array(3), checkpoint_step=np.array(1000))
  np.savez(ref_path, arr_0=ref_images)
  result = _run_cli(f"--samples={samples_path}", f"--reference={ref_path}",
                    f"--inception_weights={hashed_weights}", "--batch_size=8")
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / "samples_ddim50_metrics.json").read_text())
  assert out["metadata"] == {"method": "ddim", "num_steps": 50, "guidance_scale": 2.0,
                             "seed": 3, "checkpoint_step": 1000}
  assert out["num_samples"] == 10 and out["num_reference"] == 10
  fid_row = next(row for row in out["scores"] if row["metric"] == "fid")
  assert fid_row["label"] == "FID-10 (proxy)"
  assert {k: fid_row[k] for k in ("num_samples", "method", "num_steps", "guidance_scale",
                                  "seed")} == {"num_samples": 10, "method": "ddim",
                                               "num_steps": 50, "guidance_scale": 2.0, "seed": 3}
  assert {row["metric"] for row in out["scores"]} == {"fid", "sfid", "kid", "is", "precision",
                                                     "recall"}
  assert "sFID-10 (proxy)" in result.stdout
  assert "FID-10 (proxy)" in result.stdout and "ddim" in result.stdout
  # FID from torch-fidelity's features of the same images, in closed form for N < D: with
  # centred features X1, X2 [n, D], tr((S1 S2)^(1/2)) = sum of singular values of X1 X2^T / (n-1).
  feats = fidelity_reference.reference_features(hashed_weights,
                                                np.concatenate([samples, ref_images]))
  x1, x2 = feats["pool"][:10].astype(np.float64), feats["pool"][10:].astype(np.float64)
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / 9
  expected = (np.sum((x1.mean(0) - x2.mean(0)) ** 2) + (np.sum(c1 ** 2) + np.sum(c2 ** 2)) / 9
              - 2 * trace_sqrt)
  assert out["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)


def test_bad_npz_is_one_line_on_stderr(tmp_path):
  path = tmp_path / "s.npz"
  np.savez(path, images=_images(0, 2))
  result = _run_cli(f"--samples={path}", f"--reference={path}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "no 'arr_0'" in lines[0], result.stderr


def _main_error(capsys, **options):
  with pytest.raises(SystemExit) as exit_info:
    cli.call(evaluate.run, evaluate.EvaluateOptions(**options), evaluate.ERRORS)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1
  return lines[0]


def test_errors_from_main(tmp_path, capsys, hashed_weights):
  good = tmp_path / "good.npz"
  np.savez(good, arr_0=_images(0, 4))
  floats = tmp_path / "floats.npz"
  np.savez(floats, arr_0=np.zeros((2, 8, 8, 3), np.float32))
  corrupt = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  shutil.copy(hashed_weights, corrupt)
  common = {"samples": str(good), "reference": str(good)}
  assert "--inception_weights" in _main_error(
      capsys, inception_weights=str(tmp_path / "missing.pth"), **common)
  assert "checksum mismatch" in _main_error(capsys, inception_weights=str(corrupt), **common)
  assert "float32" in _main_error(capsys, samples=str(floats), reference=str(good))
  assert "exactly one of" in _main_error(capsys, samples=str(good))
