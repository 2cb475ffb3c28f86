r"""Scores generated samples: FID, KID, Inception Score and precision/recall.

  python -m jaxdiff.evaluate --samples=S.npz --reference=R.npz
  python -m jaxdiff.evaluate --samples=S.npz --dataset=cifar10 --split=train

S.npz holds `arr_0`: uint8 [N, H, W, C] (the sample CLI's output, with its metadata);
R.npz holds reference images (`arr_0`, like ADM's reference batches) or cached statistics
(`mu`, `sigma`, and `features` for KID and precision/recall). `--dataset` computes the
statistics of a TFDS split once and caches them under --cache_dir.

Results go to JSON next to the samples (S_metrics.json, or --output) and to a table on stdout;
each score carries the sample count, sampler, steps, guidance and seed. FID from fewer than
10,000 samples is labelled "FID-<n> (proxy)". Bad input exits with one line on stderr
(`error: ...`) and status 2 (see `jaxdiff.cli`).
"""
import dataclasses
import json
import os

from jaxdiff import cli
from jaxdiff.eval import evaluator
from jaxdiff.eval import features as features_lib
from jaxdiff.eval import reference as reference_lib
from jaxdiff.eval import weights

# Sample-CLI metadata shown next to every score.
CONTEXT_KEYS = ("method", "num_steps", "guidance_scale", "seed", "checkpoint_step")


def _option(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
  """What the CLI was asked to do; each field is the flag of the same name (`jaxdiff.cli`)."""
  samples: str | None = _option(None, "Samples .npz (arr_0: uint8 [N, H, W, C]).")
  reference: str | None = _option(
      None, "Reference .npz of images (arr_0) or statistics (mu, sigma[, features]).")
  dataset: str | None = _option(None, "TFDS dataset for reference statistics.")
  split: str = _option("train", "Split of --dataset.")
  image_size: int = _option(32, "Image size of --dataset images.")
  data_dir: str | None = _option(None, "TFDS data directory for --dataset.")
  max_reference_images: int | None = _option(None, "Use only the first N images of --dataset.")
  inception_weights: str | None = _option(
      None, "Local FID Inception weights (pt_inception-2015-12-05-6726825d.pth or "
      "weights-inception-2015-12-05-6726825d.pth); unset: cache or download.")
  cache_dir: str = _option(weights.DEFAULT_CACHE_DIR,
                           "Where weights and dataset statistics are cached.")
  metrics: str = _option(",".join(evaluator.ALL_METRICS),
                         "Comma-separated, any of fid, sfid, kid, is, pr.")
  batch_size: int = _option(200, "Images per feature batch (all devices).")
  kid_subsets: int = _option(100, "KID subsets.")
  kid_subset_size: int = _option(1000, "KID subset size (capped at N).")
  output: str | None = _option(None, "Results JSON (default: <samples>_metrics.json).")


def _load_reference(options: EvaluateOptions, extractor) -> tuple[dict, str]:
  if options.reference:
    return reference_lib.load_reference(options.reference, extractor), options.reference
  stats, path = reference_lib.dataset_statistics(
      options.dataset, options.split, extractor, options.cache_dir,
      image_size=options.image_size, data_dir=options.data_dir, batch_size=options.batch_size,
      max_images=options.max_reference_images)
  return stats, f"{options.dataset}:{options.split} ({path})"


def score_rows(metrics: dict, metadata: dict) -> list[dict]:
  """One row per score, each with the sample count and the sampling context."""
  context = {"num_samples": metrics["num_samples"]}
  context.update({k: metadata.get(k) for k in CONTEXT_KEYS})
  n = metrics["num_samples"]
  proxy = " (proxy)" if n < evaluator.PROXY_BELOW else ""
  candidates = [
      ("fid", metrics.get("fid_label"), "fid", None),
      ("sfid", metrics.get("sfid_label"), "sfid", None),
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


def run(options: EvaluateOptions) -> dict:
  """Evaluates per the options; returns (and writes) the results dict."""
  if not options.samples:
    raise cli.UsageError("--samples=S.npz is required")
  if bool(options.reference) == bool(options.dataset):
    raise cli.UsageError("pass exactly one of --reference=R.npz or --dataset=NAME")
  names = tuple(name.strip() for name in options.metrics.split(",") if name.strip())
  unknown = sorted(set(names) - set(evaluator.ALL_METRICS))
  if unknown:
    raise cli.UsageError(f"--metrics={options.metrics!r}: unknown {unknown}; choose from "
                         f"{', '.join(evaluator.ALL_METRICS)}")
  images, metadata = reference_lib.load_samples(options.samples)
  weights_path = weights.resolve_weights_path(options.inception_weights, options.cache_dir)
  model, variables = weights.load_inception(weights_path)
  extractor = features_lib.FeatureExtractor(model, variables, options.batch_size)
  reference, reference_name = _load_reference(options, extractor)
  metrics = evaluator.compute_metrics(
      extractor(images), reference, names, options.kid_subsets, options.kid_subset_size)
  results = {
      "samples": options.samples, "reference": reference_name,
      "num_samples": metrics["num_samples"], "num_reference": reference.get("num_images"),
      "inception_weights": weights_path,
      "metadata": metadata, "metrics": metrics, "scores": score_rows(metrics, metadata),
  }
  output = options.output or os.path.splitext(options.samples)[0] + "_metrics.json"
  with open(output, "w") as f:
    json.dump(results, f, indent=2)
  print(format_table(results["scores"]))
  for name, reason in metrics.get("skipped", {}).items():
    print(f"skipped {name}: {reason}")
  print(f"wrote {output}")
  return results


ERRORS = (ValueError, OSError)


def main() -> None:
  """The program: flags from `EvaluateOptions`, then `run` under the `jaxdiff.cli` convention."""
  cli.main(EvaluateOptions, run, ERRORS)


if __name__ == "__main__":
  main()
