"""Proxy FID during training (`eval.fid_every`): EMA samples scored against reference statistics."""

from typing import Callable

from jaxdiff.train import builder
from jaxdiff.train.state import TrainState


def make_fid_fn(run: builder.Run) -> Callable[[TrainState], dict[str, float]]:
  """state -> {"eval/fid", "eval/fid_num_samples"}: FID of `eval.num_samples` EMA samples.

  Samples are drawn with the run's sample settings, `sample.num_images` per sampler call, from
  consecutive global indices, and scored against `eval.reference_stats`. Weight and reference
  errors are raised here, before training starts.
  """
  from jaxdiff.eval import FidEvaluator  # pylint: disable=g-import-not-at-top  (heavy, optional)
  cfg = run.config
  evaluator = FidEvaluator(cfg.eval.inception_weights or None, cfg.eval.reference_stats)
  generate = builder.make_ema_sampler(run, builder.FID_STREAM, cfg.sample.num_images)

  def evaluate(state: TrainState) -> dict[str, float]:
    samples = generate(state, cfg.eval.num_samples)
    scores = evaluator.score(samples, names=("fid",))
    return {"eval/fid": float(scores["fid"]), "eval/fid_num_samples": len(samples)}
  return evaluate
