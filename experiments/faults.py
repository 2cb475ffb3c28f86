"""Runs the fault-injection suite and writes docs/reliability.md (figures per fault).

  PYTHONPATH=. .venv/bin/python experiments/faults.py [--trials=12] [--out=docs/reliability.md]

Uses the harness of the tests (tests/fault_harness.py, tests/bad_inputs.py): the real training,
sampling and evaluation CLIs in subprocesses, on the offline default shrunk to a tiny run
(`configs/mnist_offline.py:tiny`, 8x8 digits, 8 steps, an asynchronous checkpoint every 2 steps).
Every number in the report is measured by this script on the machine it ran on; the machine's
load is recorded with it.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import bad_inputs  # pylint: disable=g-import-not-at-top,wrong-import-position
import fault_harness as harness  # pylint: disable=g-import-not-at-top,wrong-import-position


def reference_run(root: str, cache: str) -> tuple[str, float]:
  """The uninterrupted run (it also fills the compilation cache the trials load from)."""
  reference = os.path.join(root, "reference")
  status, stderr, seconds = harness.run(reference, cache_dir=cache)
  assert status == 0, stderr[-2000:]
  return harness.final_digest(reference), seconds


def sigkill_trial(root: str, cache: str, index: int, fault, kill_at, digest: str) -> dict:
  workdir = os.path.join(root, f"kill_{index}")
  trial = harness.kill_trial(workdir, fault, kill_at, cache_dir=cache)
  same = trial.resume_status == 0 and harness.final_digest(workdir) == digest
  return {**dataclasses.asdict(trial), "bitwise_equal": same,
          "leftovers_after": harness.leftovers(workdir)}


def disk_full(root: str, cache: str) -> list[dict]:
  rows = []
  injected = os.path.join(root, "enospc")
  status, stderr, _ = harness.run(injected, fault="enospc:4", cache_dir=cache)
  intact = harness.checkpoint_steps(injected)
  status2, _, seconds = harness.run(injected, cache_dir=cache)
  rows.append({"case": "ENOSPC injected in the background write of step 4", "status": status,
               "message": stderr.strip().splitlines()[-1] if stderr.strip() else "",
               "intact": intact, "resumed": status2 == 0, "resume_seconds": seconds})
  mount = os.path.join(root, "tmpfs")
  if harness.try_mount_tmpfs(mount, "7m"):
    try:
      workdir = os.path.join(mount, "run")
      status, stderr, _ = harness.run(workdir, cache_dir=cache)
      intact = harness.checkpoint_steps(workdir)
      harness.resize_tmpfs(mount, "64m")
      status2, _, seconds = harness.run(workdir, cache_dir=cache)
      rows.append({"case": "7 MiB tmpfs fills up", "status": status,
                   "message": stderr.strip().splitlines()[-1] if stderr.strip() else "",
                   "intact": intact, "resumed": status2 == 0, "resume_seconds": seconds})
    finally:
      harness.unmount(mount)
  else:
    rows.append({"case": "7 MiB tmpfs fills up", "status": None,
                 "message": "not run: mount not permitted", "intact": [], "resumed": False,
                 "resume_seconds": 0.0})
  return rows


def corrupt_data(root: str) -> list[dict]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxdiff import data  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import sources  # pylint: disable=g-import-not-at-top
  rows = []

  def attempt(name, cfg, skip_cfg):
    row = {"case": name}
    try:
      iterator = data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                          process_count=1)
      next(iterator)
      row["message"] = "(no error)"
    except (data.BadRecordError, data.DatasetNotFoundError) as error:
      row["message"] = str(error)
    iterator = data.make_train_iterator(skip_cfg, global_batch_size=4, seed=0, process_index=0,
                                        process_count=1)
    try:
      for _ in range(3):
        next(iterator)
      row["skipped_with_opt_in"] = iterator.skipped_records
    except data.BadRecordError as error:  # nothing left to read
      row["skipped_with_opt_in"] = f"{iterator.skipped_records}, then: {error}"
    iterator.close()
    rows.append(row)

  for extension in (".png", ".jpg"):
    folder = os.path.join(root, f"images{extension}")
    os.makedirs(os.path.join(folder, "a"))
    for i in range(6):
      Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(
          os.path.join(folder, "a", f"{i}{extension}"))
    with open(os.path.join(folder, "a", f"3{extension}"), "r+b") as f:
      f.truncate(os.path.getsize(f.name) // 2)
    cfg = data.DataConfig(source="folder", folder=folder, image_size=8)
    attempt(f"truncated {extension[1:].upper()} in an image folder", cfg,
            dataclasses.replace(cfg, skip_bad_records=True))
  import tfds_digits  # pylint: disable=g-import-not-at-top  (registers the test TFDS builder)
  del tfds_digits
  prepared = sources.prepare_tfds("jaxdiff_test_digits", os.path.join(root, "tfds"))
  shard = next(os.path.join(prepared, f) for f in os.listdir(prepared) if "train.array" in f)
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  cfg = data.DataConfig(source="tfds", name="jaxdiff_test_digits",
                        data_dir=os.path.join(root, "tfds"), image_size=28, download=False)
  attempt("ArrayRecord shard cut in half", cfg, dataclasses.replace(cfg, skip_bad_records=True))
  with gzip.open(sources.mnist_offline_path(), "rt") as f:
    lines = f.readlines()
  lines[41] = lines[41].replace(",", ";", 3)
  path = os.path.join(root, "mnist_5k.csv.gz")
  with gzip.open(path, "wt") as f:
    f.writelines(lines)
  try:
    sources.load_mnist_offline(path)
    message = "(no error)"
  except data.BadRecordError as error:
    message = str(error)
  rows.append({"case": "malformed row in the offline digits file", "message": message,
               "skipped_with_opt_in": sources.load_mnist_offline(path, True)[2]})
  return rows


def dead_peer(root: str, cache: str) -> dict:
  peer = harness.dead_peer_trial(os.path.join(root, "pair"), ["--config.train.num_steps=12"],
                                 heartbeat=10, cache_dir=cache)
  stderr = peer["survivor_stderr"].splitlines()
  lines = ([l for l in stderr if "another task died" in l] or
           [l for l in stderr if "heartbeat" in l.lower()])
  peer["message"] = lines[0].split("] ", 1)[-1][:240] if lines else "(none)"
  peer["survivor_stderr"] = ""
  return peer


def bad_input_table(root: str) -> list[dict]:
  sandbox = os.path.join(root, "sandbox")
  os.makedirs(sandbox)
  bad_inputs.make_sandbox(sandbox)
  bad_inputs.make_checkpoints(sandbox)
  work = os.path.join(root, "drivers")
  os.makedirs(work)
  outcomes = bad_inputs.run_cases(bad_inputs.CASES, sandbox, work)
  rows = []
  for name, cli, cli_args, expected, _ in bad_inputs.CASES:
    result = outcomes[name]
    lines = result["stderr"].strip().splitlines()
    rows.append({"name": f"`{cli} {' '.join(cli_args)}`".replace("{root}", "SANDBOX"),
                 "status": result["status"], "one_line": len(lines) == 1,
                 "names_the_problem": bool(lines) and expected in lines[-1],
                 "unchanged": result["unchanged"],
                 "message": (lines[-1] if lines else "").replace(sandbox, "SANDBOX")[:300]})
  return rows


def nonfinite(root: str, cache: str) -> list[dict]:
  """A poisoned batch (step 3) with and without train.skip_nonfinite_updates, in subprocesses."""
  rows = []
  for skip in (False, True):
    workdir = os.path.join(root, f"nan_{skip}")
    env = harness.env(cache_dir=cache)
    env["JAXDIFF_TEST_POISON_BATCH"] = "2"
    import subprocess  # pylint: disable=g-import-not-at-top
    process = subprocess.run(
        harness.command(workdir, ["--config.train.num_steps=4",
                                  f"--config.train.skip_nonfinite_updates={skip}"]),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    skipped = None
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        skipped = sum(r.get("train/skipped_updates", 0) for r in map(json.loads, f))
    rows.append({"skip": skip, "status": process.returncode,
                 "message": (process.stderr.strip().splitlines() or [""])[-1],
                 "skipped_logged": skipped, "final_steps": harness.checkpoint_steps(workdir)})
  return rows


def write_report(path: str, info: dict, kills, reference_seconds, disk, corrupt, peer, nan,
                 bad) -> None:
  out = ["# Reliability: faults injected, and what survived", "",
         f"Generated by `experiments/faults.py` on {info['date']} ({info['machine']}, "
         f"{info['cpus']} CPUs; load average {info['load_start']} at the start, "
         f"{info['load_end']} at the end: the machine was shared, so times are upper bounds). "
         f"Total wall time {info['seconds']:.0f} s.", "",
         "Run: `configs/mnist_offline.py:tiny` at 8x8, 8 steps, an asynchronous checkpoint every "
         "2 steps (`tests/fault_harness.py`). An uninterrupted run took "
         f"{reference_seconds:.0f} s (compilation included). Every trial compares the final "
         "params, EMA params, optimizer state, step and data position with that run's, bit for "
         "bit (sha256 of the restored arrays).", "",
         "## Summary", "", "| fault | trials | survived | steps lost | time to resume |",
         "|---|---|---|---|---|"]
  survived = sum(r["bitwise_equal"] and not r["leftovers_after"] for r in kills)
  lost = [r["steps_lost"] for r in kills]
  resume = [r["resume_seconds"] for r in kills]
  out.append(f"| SIGKILL (compile, mid-step, async save, random time) | {len(kills)} | "
             f"{survived} | {min(lost)}-{max(lost)} (mean {sum(lost) / len(lost):.1f}) | "
             f"{min(resume):.0f}-{max(resume):.0f} s (whole rerun) |")
  ok_disk = sum(r["status"] == 2 and r["resumed"] for r in disk)
  out.append(f"| disk full during a save | {len(disk)} | {ok_disk} | "
             f"since the intact step | {max(r['resume_seconds'] for r in disk):.0f} s |")
  ok_data = sum(" cannot" in r["message"] or "is not 784" in r["message"] for r in corrupt)
  out.append(f"| corrupt data | {len(corrupt)} | {ok_data} (named the file) | - | - |")
  if peer:
    ok_peer = int(peer["survivor_status"] != 0 and peer["restart_statuses"] == [0, 0])
    out.append(f"| dead peer (2 processes) | 1 | {ok_peer} | since the last checkpoint | "
               f"survivor exited {peer['survivor_seconds']:.0f} s after the kill |")
  ok_nan = int(nan[0]["status"] == 2 and nan[1]["status"] == 0)
  out.append(f"| non-finite loss (poisoned batch) | 2 | {ok_nan * 2} | - | - |")
  ok_bad = sum(r["status"] == 2 and r["one_line"] and r["unchanged"] and r["names_the_problem"]
               for r in bad)
  out.append(f"| bad input (train, sample, evaluate) | {len(bad)} | {ok_bad} (one line naming "
             "the problem, exit 2, nothing changed; the others: evaluate exits 1) | - | - |")
  out += ["", "## SIGKILL trials", "",
          "| fault | killed | steps saved at the kill | temporaries left | steps lost | "
          "rerun | rerun time | bitwise equal |", "|---|---|---|---|---|---|---|---|"]
  for r in kills:
    out.append(f"| {r['fault']} | {r['killed_status']} | {r['steps_saved_at_kill']} | "
               f"{', '.join(r['leftovers_at_kill']) or '-'} | {r['steps_lost']} | "
               f"exit {r['resume_status']} | {r['resume_seconds']:.0f} s | "
               f"{'yes' if r['bitwise_equal'] else 'NO'} |")
  out += ["", "Temporaries (`<step>.orbax-checkpoint-tmp`) are never listed as steps; the rerun "
          "deletes them (`cleanup_tmp_directories`), so none is left after any trial.", "",
          "## Disk full", "", "| case | exit | message | intact steps | resumed |",
          "|---|---|---|---|---|"]
  for r in disk:
    out.append(f"| {r['case']} | {r['status']} | `{r['message']}` | {r['intact']} | "
               f"{'yes' if r['resumed'] else 'no'} |")
  out += ["", "## Corrupt data", "", "| case | message | skipped with data.skip_bad_records |",
          "|---|---|---|"]
  for r in corrupt:
    out.append(f"| {r['case']} | `{r['message']}` | {r['skipped_with_opt_in']} |")
  out += ["", "With the opt-in, a bad record is replaced by the next readable one of the epoch's "
          "order (a function of the position only, so resuming stays exact); the count, read-ahead "
          "included, is logged as `data/skipped_records`.", ""]
  if peer:
    out += ["## Dead peer", "",
            f"Two processes (jax.distributed on 127.0.0.1, gloo), `--heartbeat_timeout_seconds=10`; "
            f"process 1 SIGKILLed after checkpoint {peer['steps_at_kill']}. Process 0 exited with "
            f"status {peer['survivor_status']} after {peer['survivor_seconds']:.0f} s: "
            f"`{peer['message']}`. Restarting both: exit statuses {peer['restart_statuses']}, "
            f"checkpoints {peer['final_steps']}.", ""]
  out += ["## Non-finite loss", "", "| train.skip_nonfinite_updates | exit | last line | "
          "skipped updates logged | checkpoints |", "|---|---|---|---|---|"]
  for r in nan:
    out.append(f"| {r['skip']} | {r['status']} | `{r['message']}` | {r['skipped_logged']} | "
               f"{r['final_steps']} |")
  out += ["", "## Bad inputs", "", "Each case runs the CLI's `main` through `absl.app.run` as "
          "`python -m` does (tests/bad_inputs.py), with stderr captured at file descriptor 2 and "
          "the sandbox hashed before and after.", "",
          "| input | exit | one line naming the problem | nothing changed | message |",
          "|---|---|---|---|---|"]
  for r in bad:
    named = r["one_line"] and r["names_the_problem"]
    out.append(f"| {r['name']} | {r['status']} | {'yes' if named else 'NO'} | "
               f"{'yes' if r['unchanged'] else 'NO'} | `{r['message']}` |")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")


def _sanitise(value, root: str):
  """Temporary paths shortened to TMP and table pipes escaped, in every string of `value`."""
  if isinstance(value, str):
    return value.replace(root, "TMP").replace("|", "\\|")
  if isinstance(value, list):
    return [_sanitise(v, root) for v in value]
  if isinstance(value, dict):
    return {k: _sanitise(v, root) for k, v in value.items()}
  return value


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--parallel", type=int, default=8, help="Trials run at the same time.")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"))
  parser.add_argument("--skip_peer", action="store_true")
  parser.add_argument("--results", default=os.path.join(REPO, "experiments", "results",
                                                        "faults.json"),
                      help="Raw results (JSON), written before the report.")
  parser.add_argument("--only_bad_inputs", action="store_true",
                      help="Rerun only the bad-input table into --results and the report.")
  parser.add_argument("--render_only", action="store_true",
                      help="Only rewrite the report from --results.")
  args = parser.parse_args()
  if args.render_only or args.only_bad_inputs:
    with open(args.results, encoding="utf-8") as f:
      results = json.load(f)
    if args.only_bad_inputs:  # rerun the bad-input table alone, keep the other figures
      root = tempfile.mkdtemp(prefix="jaxdiff_faults_")
      try:
        results["bad"] = _sanitise(bad_input_table(root), root)
      finally:
        shutil.rmtree(root, ignore_errors=True)
      with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    write_report(args.out, **results)
    return
  begin = time.perf_counter()
  info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "machine": platform.machine(), "cpus": os.cpu_count(),
          "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
  root = tempfile.mkdtemp(prefix="jaxdiff_faults_")
  cache = os.path.join(root, "jax_cache")
  try:
    # The trials run side by side (they are subprocesses that mostly wait on a shared CPU).
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
      reference = pool.submit(reference_run, root, cache)
      bad_future = pool.submit(bad_input_table, root)
      corrupt = corrupt_data(os.path.join(root, "corrupt"))
      digest, reference_seconds = reference.result()
      print(f"reference done ({time.perf_counter() - begin:.0f} s)", flush=True)
      kill_futures = [pool.submit(sigkill_trial, root, cache, i, fault, kill_at, digest)
                      for i, (fault, kill_at) in enumerate(
                          harness.random_faults(args.trials, 13, reference_seconds))]
      disk_future = pool.submit(disk_full, root, cache)
      nan_future = pool.submit(nonfinite, root, cache)
      peer_future = None if args.skip_peer else pool.submit(dead_peer, root, cache)
      kills = [f.result() for f in kill_futures]
      disk, nan, bad = disk_future.result(), nan_future.result(), bad_future.result()
      peer = peer_future.result() if peer_future else None
    clean = lambda x: _sanitise(x, root)
    kills, disk, corrupt, peer, nan, bad = map(clean, (kills, disk, corrupt, peer, nan, bad))
    info["seconds"] = time.perf_counter() - begin
    info["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = dict(info=info, kills=kills, reference_seconds=reference_seconds, disk=disk,
                   corrupt=corrupt, peer=peer, nan=nan, bad=bad)
    with open(args.results, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
    write_report(args.out, **results)
    print(f"wrote {args.out}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
