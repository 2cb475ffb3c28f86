"""Evaluation: the FID Inception-v3 in Flax and FID, KID, Inception Score, precision/recall.

Public API:
  `load_inception(weights_path=None) -> (InceptionV3, variables)`: verified FID weights
    (pytorch-fid's or torch-fidelity's `.pth`, read without torch).
  `FeatureExtractor(model, variables, batch_size)`: `(uint8 [N, H, W, 3]) -> {"pool", ...}`,
    sharded over all devices.
  `FidEvaluator(weights_path, reference_path).score(images_uint8)`: proxy FID for training.
  `compute_metrics`, `fid_from_features`, `frechet_distance`, `fid_statistics`,
  `kernel_inception_distance`, `inception_score`, `precision_recall`, `fid_label`.
"""
from jaxdiff.eval.evaluator import FidEvaluator
from jaxdiff.eval.evaluator import compute_metrics
from jaxdiff.eval.evaluator import fid_label
from jaxdiff.eval.features import FeatureExtractor
from jaxdiff.eval.features import ImageFormatError
from jaxdiff.eval.inception import InceptionV3
from jaxdiff.eval.metrics import fid_from_features
from jaxdiff.eval.metrics import fid_statistics
from jaxdiff.eval.metrics import frechet_distance
from jaxdiff.eval.metrics import inception_score
from jaxdiff.eval.metrics import kernel_inception_distance
from jaxdiff.eval.metrics import precision_recall
from jaxdiff.eval.reference import ReferenceFileError
from jaxdiff.eval.weights import WeightsError
from jaxdiff.eval.weights import load_inception

__all__ = [
    "FeatureExtractor",
    "FidEvaluator",
    "ImageFormatError",
    "InceptionV3",
    "ReferenceFileError",
    "WeightsError",
    "compute_metrics",
    "fid_from_features",
    "fid_label",
    "fid_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_inception",
    "precision_recall",
]
