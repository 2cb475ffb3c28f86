"""Scores generated 32x32 digits (`samples_*.npz` of `python -m jaxdiff.sample`) offline.

For each file: the Fréchet distance of a JAX digit classifier's penultimate features to the
5,000 real digits, class coverage and shares, and the share of confidently classified samples
(`jaxdiff.eval.digits`). The classifier's held-out accuracy and the distance of 1,000 held-out
real digits (the floor for 1,000 samples) are printed first.

  python experiments/score_digits.py runs/mnist/samples_*.npz --out=scores.json
"""

import json
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff import cli  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.eval import digits  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Optional JSON output path.")
flags.DEFINE_string("cache_dir", None, "Where the trained classifier is cached "
                    "(default ~/.cache/jaxdiff).")

COLUMNS = [("file", "samples", ""), ("num_samples", "n", "d"),
           ("frechet_distance", "Fréchet distance", ".2f"),
           ("class_coverage", "class coverage", ".0%"), ("confident", "confident", ".1%"),
           ("smallest_share", "rarest class share", ".1%")]


def score_file(scorer: digits.DigitScorer, path: str) -> dict:
  """One row: the scores of the uint8 images in `path`'s arr_0."""
  with np.load(path) as data:
    if "arr_0" not in data:
      raise ValueError(f"{path} has no arr_0 (uint8 [N, 32, 32, C] samples)")
    samples = data["arr_0"]
  scores = digits.score_digits(scorer, samples)
  return {"file": path, **scores, "smallest_share": min(scores["class_shares"])}


def main(argv):
  paths = argv[1:]
  if not paths:
    cli.fail("give one or more samples_*.npz files: python experiments/score_digits.py FILE...")
  for path in paths:
    if not os.path.exists(path):
      cli.fail(f"{path} does not exist: pass the npz files written by python -m jaxdiff.sample")
  scorer = digits.load_scorer(FLAGS.cache_dir)
  print(f"digit classifier: held-out accuracy {scorer.held_out_accuracy:.1%}; 1,000 held-out "
        f"real digits score a Fréchet distance of {scorer.held_out_distance:.2f}")
  try:
    rows = [score_file(scorer, path) for path in paths]
  except ValueError as error:
    cli.fail(error)
  print(common.format_table(rows, COLUMNS))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"held_out_accuracy": scorer.held_out_accuracy,
                 "held_out_distance": scorer.held_out_distance, "rows": rows}, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  app.run(main)
