r"""Scores generated samples: FID, KID, Inception Score and precision/recall.

  python -m jaxdiff.evaluate --samples=S.npz --reference=R.npz
  python -m jaxdiff.evaluate --samples=S.npz --dataset=cifar10 --split=train

S.npz holds `arr_0`: uint8 [N, H, W, C] (the sample CLI's output, with its metadata);
R.npz holds reference images (`arr_0`, like ADM's reference batches) or cached statistics
(`mu`, `sigma`, and `features` for KID and precision/recall). `--dataset` computes the
statistics of a TFDS split once and caches them under --cache_dir.

Results go to JSON next to the samples (S_metrics.json, or --output) and to a table on stdout;
each score carries the sample count, sampler, steps, guidance and seed. FID from fewer than
10,000 samples is labelled "FID-<n> (proxy)". Bad input ends with one line on stderr, exit 1.
"""
import json
import os
import sys

from absl import app
from absl import flags

from jaxdiff.eval import evaluator
from jaxdiff.eval import features as features_lib
from jaxdiff.eval import reference as reference_lib
from jaxdiff.eval import weights

_SAMPLES = flags.DEFINE_string("samples", None, "Samples .npz (arr_0: uint8 [N, H, W, C]).")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Reference .npz of images (arr_0) or statistics (mu, sigma[, features]).")
_DATASET = flags.DEFINE_string("dataset", None, "TFDS dataset for reference statistics.")
_SPLIT = flags.DEFINE_string("split", "train", "Split of --dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image size of --dataset images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory for --dataset.")
_MAX_REFERENCE = flags.DEFINE_integer(
    "max_reference_images", None, "Use only the first N images of --dataset.")
_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None,
    "Local FID Inception weights (pt_inception-2015-12-05-6726825d.pth or "
    "weights-inception-2015-12-05-6726825d.pth); unset: cache or download.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", weights.DEFAULT_CACHE_DIR, "Where weights and dataset statistics are cached.")
_METRICS = flags.DEFINE_list("metrics", list(evaluator.ALL_METRICS), "Any of fid, kid, is, pr.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 200, "Images per feature batch (all devices).")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID subsets.")
_KID_SUBSET_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID subset size (capped at N).")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON (default: <samples>_metrics.json).")

# Sample-CLI metadata shown next to every score.
CONTEXT_KEYS = ("method", "num_steps", "guidance_scale", "seed", "checkpoint_step")


class UsageError(ValueError):
  """Flags that do not make sense together."""


def _load_reference(extractor) -> tuple[dict, str]:
  if _REFERENCE.value:
    return reference_lib.load_reference(_REFERENCE.value, extractor), _REFERENCE.value
  stats, path = reference_lib.dataset_statistics(
      _DATASET.value, _SPLIT.value, extractor, _CACHE_DIR.value, image_size=_IMAGE_SIZE.value,
      data_dir=_DATA_DIR.value, batch_size=_BATCH_SIZE.value,
      max_images=_MAX_REFERENCE.value)
  return stats, f"{_DATASET.value}:{_SPLIT.value} ({path})"


def score_rows(metrics: dict, metadata: dict) -> list[dict]:
  """One row per score, each with the sample count and the sampling context."""
  context = {"num_samples": metrics["num_samples"]}
  context.update({k: metadata.get(k) for k in CONTEXT_KEYS})
  n = metrics["num_samples"]
  proxy = " (proxy)" if n < evaluator.PROXY_BELOW else ""
  candidates = [
      ("fid", metrics.get("fid_label"), "fid", None),
      ("kid", f"KID-{n}{proxy}", "kid_mean", "kid_std"),
      ("is", f"IS-{n}{proxy}", "inception_score_mean", "inception_score_std"),
      ("precision", f"Precision-{n} (k=3)", "precision", None),
      ("recall", f"Recall-{n} (k=3)", "recall", None),
  ]
  rows = []
  for name, label, value_key, std_key in candidates:
    if value_key in metrics:
      rows.append({"metric": name, "label": label, "value": metrics[value_key],
                   "std": metrics.get(std_key) if std_key else None, **context})
  return rows


def format_table(rows: list[dict]) -> str:
  """Fixed-width text table of score rows."""
  columns = ("label", "value", "std", "num_samples") + CONTEXT_KEYS
  cells = [[("" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float)
             else str(row[c])) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def run() -> dict:
  """Evaluates per the flags; returns (and writes) the results dict."""
  if not _SAMPLES.value:
    raise UsageError("--samples=S.npz is required")
  if bool(_REFERENCE.value) == bool(_DATASET.value):
    raise UsageError("pass exactly one of --reference=R.npz or --dataset=NAME")
  images, metadata = reference_lib.load_samples(_SAMPLES.value)
  weights_path = weights.resolve_weights_path(_WEIGHTS.value, _CACHE_DIR.value)
  model, variables = weights.load_inception(weights_path)
  extractor = features_lib.FeatureExtractor(model, variables, _BATCH_SIZE.value)
  reference, reference_name = _load_reference(extractor)
  metrics = evaluator.compute_metrics(
      extractor(images), reference, tuple(_METRICS.value), _KID_SUBSETS.value,
      _KID_SUBSET_SIZE.value)
  results = {
      "samples": _SAMPLES.value, "reference": reference_name,
      "num_samples": metrics["num_samples"], "num_reference": reference.get("num_images"),
      "inception_weights": weights_path,
      "metadata": metadata, "metrics": metrics, "scores": score_rows(metrics, metadata),
  }
  output = _OUTPUT.value or os.path.splitext(_SAMPLES.value)[0] + "_metrics.json"
  with open(output, "w") as f:
    json.dump(results, f, indent=2)
  print(format_table(results["scores"]))
  for name, reason in metrics.get("skipped", {}).items():
    print(f"skipped {name}: {reason}")
  print(f"wrote {output}")
  return results


def main(argv):
  if len(argv) > 1:
    print(f"jaxdiff.evaluate: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    run()
  except (ValueError, OSError) as e:
    message = " ".join(str(e).split())
    print(f"jaxdiff.evaluate: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
