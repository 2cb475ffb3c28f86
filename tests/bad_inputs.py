"""The bad-input table of the three CLIs and a driver that runs many cases in one process.

Each case is (name, cli, args, expected substring, needs_checkpoint); `{root}` in an argument is
the sandbox folder every case reads from. Shared by tests/test_faults.py and experiments/faults.py.

The driver runs `absl.app.run(main, argv=..., flags_parser=...)` of one CLI once per case, exactly
as `python -m jaxdiff.CLI` does, with file descriptor 2 redirected to a file (so C++ and Python
output are both captured), flags reset between cases, and the sandbox hashed before and after.
"""

import hashlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = "configs/mnist_offline.py:tiny"
# (name, cli, args, expected in the error line, needs the sandbox's checkpoint)
CASES = [
    # train: flags and config files
    ("train/unknown override", "train", [f"--config={TRAIN}", "--config.modle.depth=4",
                                         "--workdir={root}/new"], "modle", False),
    ("train/no --config", "train", ["--workdir={root}/new"], "--config", False),
    ("train/no --workdir", "train", [f"--config={TRAIN}"], "--workdir", False),
    ("train/extra argument", "train", [f"--config={TRAIN}", "--workdir={root}/new", "extra"],
     "extra", False),
    ("train/missing config file", "train", ["--config=configs/nope.py", "--workdir={root}/new"],
     "nope.py", False),
    ("train/unknown variant", "train", ["--config=configs/mnist_offline.py:huge",
                                        "--workdir={root}/new"], "huge", False),
    ("train/override of the wrong type", "train", [f"--config={TRAIN}",
                                                   "--config.train.num_steps=many",
                                                   "--workdir={root}/new"], "num_steps", False),
    # train: config fields
    ("train/unknown model", "train", [f"--config={TRAIN}", "--config.model.name=dit-huge",
                                      "--workdir={root}/new"], "model.name", False),
    ("train/unknown schedule", "train", [f"--config={TRAIN}",
                                         "--config.diffusion.schedule=squiggly",
                                         "--workdir={root}/new"], "diffusion.schedule", False),
    ("train/negative learning rate", "train", [f"--config={TRAIN}",
                                               "--config.optimizer.learning_rate=-1.0",
                                               "--workdir={root}/new"], "learning_rate", False),
    ("train/zero batch", "train", [f"--config={TRAIN}", "--config.train.batch_size=0",
                                   "--workdir={root}/new"], "batch_size", False),
    ("train/two channels", "train", [f"--config={TRAIN}", "--config.data.channels=2",
                                     "--workdir={root}/new"], "channels", False),
    ("train/folder source without folder", "train", [f"--config={TRAIN}",
                                                      "--config.data.source=folder",
                                                      "--workdir={root}/new"], "folder", False),
    ("train/missing image folder", "train", [f"--config={TRAIN}", "--config.data.source=folder",
                                             "--config.data.folder={root}/no_images",
                                             "--workdir={root}/new"], "no_images", False),
    ("train/image size the DiT patches cannot tile", "train", [
        "--config=configs/base.py:tiny", "--config.data.image_size=15", "--workdir={root}/new"],
     "patch size 2", False),
    ("train/latent run without an autoencoder", "train", [
        "--config=configs/mnist_latent_dit.py:tiny", "--config.autoencoder.path=",
        "--workdir={root}/new"], "autoencoder.path", False),
    ("train/autoencoder with a diffusion model name", "train", [
        "--config=configs/mnist_autoencoder.py:tiny", "--config.model.name=dit-tiny",
        "--workdir={root}/new"], "model.name", False),
    ("train/autoencoder with an unknown loss", "train", [
        "--config=configs/mnist_autoencoder.py:tiny", "--config.autoencoder.loss_type=huber",
        "--workdir={root}/new"], "autoencoder.loss_type", False),
    ("train/FID without reference statistics", "train", [
        f"--config={TRAIN}", "--config.eval.fid_every=4", "--workdir={root}/new"],
     "eval.reference_stats", False),
    ("train/guidance without label dropout", "train", [
        f"--config={TRAIN}", "--config.model.class_dropout_prob=0.0",
        "--config.sample.guidance_scale=2.0", "--workdir={root}/new"],
     "guidance", False),
    # train: files and checkpoints
    ("train/checkpoint of another model", "train", [
        "--config=configs/base.py:tiny", "--config.data.image_size=8",
        "--workdir={root}/run"], "different model", True),
    ("train/checkpoint of another EMA set", "train", [
        f"--config={TRAIN}", "--config.data.image_size=8", "--config.train.ema_decays=(0.5,)",
        "--config.sample.ema_decay=0.5", "--workdir={root}/run"], "train.ema_decays", True),
    ("train/unreadable latest checkpoint", "train", [
        f"--config={TRAIN}", "--config.data.image_size=8", "--workdir={root}/broken_run"],
     "unreadable", True),
    # sample
    ("sample/neither --workdir nor --diffusers", "sample", [], "exactly one", False),
    ("sample/both sources", "sample", ["--workdir={root}/run", "--diffusers={root}/run"],
     "exactly one", False),
    ("sample/missing workdir", "sample", ["--workdir={root}/nowhere"], "not a directory", False),
    ("sample/workdir without checkpoints", "sample", ["--workdir={root}/images"],
     "no checkpoint", False),
    ("sample/unknown method", "sample", ["--workdir={root}/images", "--method=magic"],
     "--method", False),
    ("sample/zero steps", "sample", ["--workdir={root}/images", "--num_steps=0"],
     "--num_steps", False),
    ("sample/negative eta", "sample", ["--workdir={root}/images", "--eta=-1"], "--eta", False),
    ("sample/labels not integers", "sample", ["--workdir={root}/images", "--labels=a,b"],
     "--labels", False),
    ("sample/non-integer flag", "sample", ["--workdir={root}/images", "--num_samples=lots"],
     "num_samples", False),
    ("sample/unknown flag", "sample", ["--workdir={root}/images", "--nmu_steps=3"],
     "nmu_steps", False),
    ("sample/diffusers folder without a model", "sample", ["--diffusers={root}/images"],
     "config.json", False),
    ("sample/missing checkpoint step", "sample", ["--workdir={root}/run", "--step=3"],
     "step 3", True),
    ("sample/EMA the run does not keep", "sample", ["--workdir={root}/run", "--ema_decay=0.5"],
     "0.5", True),
    ("sample/unreadable checkpoint", "sample", ["--workdir={root}/broken_run"], "unreadable",
     True),
    # evaluate
    ("evaluate/no --samples", "evaluate", ["--reference={root}/samples.npz"], "--samples",
     False),
    ("evaluate/both references", "evaluate", ["--samples={root}/samples.npz",
                                              "--reference={root}/samples.npz",
                                              "--dataset=cifar10"], "exactly one", False),
    ("evaluate/missing samples file", "evaluate", ["--samples={root}/nowhere.npz",
                                                   "--reference={root}/samples.npz"],
     "nowhere.npz", False),
    ("evaluate/samples file not an npz", "evaluate", ["--samples={root}/garbage.npz",
                                                      "--reference={root}/samples.npz"],
     "garbage.npz", False),
    ("evaluate/float samples", "evaluate", ["--samples={root}/float_samples.npz",
                                            "--reference={root}/samples.npz"], "uint8", False),
    ("evaluate/extra argument", "evaluate", ["--samples={root}/samples.npz", "extra"], "extra",
     False),
]

DRIVER = r"""
import hashlib, importlib, json, os, sys, tempfile, traceback
from absl import app, flags
cli, cases_path, results_path, root = sys.argv[1:5]
name = {"train": "jaxdiff.train.__main__", "sample": "jaxdiff.sample",
        "evaluate": "jaxdiff.evaluate"}[cli]
import jaxdiff.data  # defines grain's absl flags, which must survive the resets below
absl_flags = set(flags.FLAGS)

def fresh_cli():
  # A fresh copy of the CLI module and its flags for every case, as in a new process:
  # config_flags adds --config.* flags while parsing, which unparse_flags does not undo.
  for flag in set(flags.FLAGS) - absl_flags:
    delattr(flags.FLAGS, flag)
  module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
  return module, getattr(module, "parse_flags", None)

def digest(folder):
  h = hashlib.sha256()
  for base, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    h.update(base.encode())
    for name in sorted(files):
      with open(os.path.join(base, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()

results = []
for args in json.load(open(cases_path)):
  before = digest(root)
  flags.FLAGS.unparse_flags()
  module, parser = fresh_cli()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    try:
      sys.argv = [f"jaxdiff.{cli}", *args]  # config_flags reads its overrides from sys.argv
      if cli == "train":
        app.run(module.main, argv=sys.argv, flags_parser=parser)
      else:  # sample and evaluate: jaxdiff.cli derives the flags from the options dataclass
        module.main()
      status = 0
    except SystemExit as exit_:
      status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
      traceback.print_exc()
      status = 1
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    capture.seek(0)
    stderr = capture.read().decode(errors="replace")
  results.append({"status": status, "stderr": stderr, "unchanged": digest(root) == before})
json.dump(results, open(results_path, "w"))
"""


def subprocess_env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "TFDS_DATA_DIR":
          "/nonexistent/tfds", "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
          "--xla_backend_optimization_level=0"}


def make_sandbox(root: str) -> None:
  """The files the cases read: an image folder with a truncated PNG, npz files, garbage."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "images", "a"), exist_ok=True)
  for i in range(3):
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
        os.path.join(root, "images", "a", f"{i}.png"))
  with open(os.path.join(root, "images", "a", "0.png"), "rb") as f:
    raw = f.read()
  with open(os.path.join(root, "images", "a", "broken.png"), "wb") as f:
    f.write(raw[:len(raw) // 2])
  rng = np.random.default_rng(0)
  np.savez(os.path.join(root, "samples.npz"),
           arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
  np.savez(os.path.join(root, "float_samples.npz"), arr_0=rng.random((4, 8, 8, 3)))
  with open(os.path.join(root, "garbage.npz"), "wb") as f:
    f.write(b"this is not a zip file")


def make_checkpoints(root: str) -> None:
  """ROOT/run: a 2-step tiny U-Net run; ROOT/broken_run: its copy with a garbled latest step."""
  import shutil  # pylint: disable=g-import-not-at-top
  run = os.path.join(root, "run")
  subprocess.run([sys.executable, "-m", "jaxdiff.train", f"--config={TRAIN}",
                  "--config.data.image_size=8", "--config.train.num_steps=2",
                  "--config.train.sample_every=0", "--config.checkpoint.every_steps=2",
                  f"--workdir={run}"], cwd=REPO, env=subprocess_env(), check=True,
                 capture_output=True, timeout=600)
  broken = os.path.join(root, "broken_run")
  shutil.copytree(run, broken)
  for name in ("_CHECKPOINT_METADATA", os.path.join("config", "metadata")):
    with open(os.path.join(broken, "checkpoints", "2", name), "w", encoding="utf-8") as f:
      f.write("{not json")


def start_driver(cli: str, cases: list[tuple], root: str, workdir: str) -> tuple:
  """Starts one CLI's driver on `cases`; returns (process, results path)."""
  cases_path = os.path.join(workdir, f"{cli}_cases.json")
  results_path = os.path.join(workdir, f"{cli}_results.json")
  with open(cases_path, "w", encoding="utf-8") as f:
    json.dump([[a.format(root=root) for a in case[2]] for case in cases], f)
  process = subprocess.Popen([sys.executable, "-c", DRIVER, cli, cases_path, results_path, root],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  return process, results_path


def run_cases(cases: list[tuple], root: str, workdir: str) -> dict[str, dict]:
  """Runs `cases` (one driver process per CLI, in parallel); {name: result} with status,
  stderr and whether the sandbox was left unchanged."""
  started = {}
  for cli in ("train", "sample", "evaluate"):
    mine = [c for c in cases if c[1] == cli]
    if mine:
      started[cli] = (mine, *start_driver(cli, mine, root, workdir))
  results = {}
  for cli, (mine, process, results_path) in started.items():
    _, stderr = process.communicate(timeout=900)
    if process.returncode != 0:
      raise RuntimeError(f"{cli} driver failed: {stderr[-3000:]}")
    with open(results_path, encoding="utf-8") as f:
      for case, result in zip(mine, json.load(f)):
        results[case[0]] = result
  return results


def sandbox_digest(root: str) -> str:
  h = hashlib.sha256()
  for base, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    h.update(base.encode())
    for name in sorted(files):
      with open(os.path.join(base, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()
