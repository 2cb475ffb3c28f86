"""Scoring generated 32x32 digits offline: a JAX digit classifier, a Fréchet distance on its
features, and class coverage.

Inception features (FID) describe natural photographs, not 32x32 grey digits, and need a
download. The field's offline substitute for MNIST is a classifier trained on the digits
themselves (as in the "Fréchet classifier distance" of conditional GAN and diffusion papers):
its held-out accuracy says how far its judgement can be trusted, its penultimate features give a
Fréchet distance (Heusel et al. 2017, eq. 6) to the real digits, and its predictions give the
share of samples per class.

The classifier trains on 4,000 of the 5,000 offline digits (`jaxdiff.data.sources`, padded to
32x32 as the training pipeline pads them) and reports its accuracy on the other 1,000 (100 per
class). Training is deterministic (a fixed seed, float32 on CPU) and takes seconds; the trained
scorer is cached as msgpack (`load_scorer`).
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxdiff.data.fit import fit_image
from jaxdiff.data.sources import load_mnist_offline, mnist_offline_path
from jaxdiff.eval.metrics import fid_statistics, frechet_distance

IMAGE_SIZE = 32
NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 100
FEATURE_DIM = 128
CACHE_VERSION = 1  # bump when the classifier, its training or its data changes


class DigitClassifier(nn.Module):
  """Two conv stages (2 x conv3x3-ReLU of 16, then 32 channels, each followed by a 2x2 average
  pool) and a 128-wide hidden layer."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x: [B, 32, 32, 1] in [-1, 1] -> (logits [B, 10], features [B, 128] after the ReLU)."""
    for stage, width in enumerate((16, 32)):
      for i in range(2):
        x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{stage}_{i}")(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES, name="logits")(features), features


@dataclasses.dataclass(frozen=True)
class DigitScorer:
  """A trained classifier and the feature statistics of the 5,000 real digits.

  Attributes:
    params: the classifier's params.
    reference_mu: [128] mean feature of the real digits (float64).
    reference_sigma: [128, 128] their covariance.
    held_out_accuracy: accuracy on the 1,000 held-out digits.
    held_out_distance: Fréchet distance of the held-out real digits to all 5,000 (the floor a
      perfect generator would reach with 1,000 samples).
  """
  params: Any
  reference_mu: np.ndarray
  reference_sigma: np.ndarray
  held_out_accuracy: float
  held_out_distance: float


def real_digits() -> tuple[np.ndarray, np.ndarray]:
  """The offline digits as the training pipeline sees them: (uint8 [5000, 32, 32, 1], labels)."""
  images, labels, _ = load_mnist_offline(mnist_offline_path())
  padded = np.stack([fit_image(image, IMAGE_SIZE, 1, "pad") for image in images])
  return padded.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1).astype(np.uint8), labels


def held_out_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices): HELD_OUT_PER_CLASS random digits of each class held out."""
  rng = np.random.default_rng(seed)
  held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:HELD_OUT_PER_CLASS]
                         for c in range(NUM_CLASSES)])
  train = np.setdiff1d(np.arange(len(labels)), held)
  return train, np.sort(held)


def to_input(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 32, 32, C] (C = 1 or 3, averaged to grey) -> float32 [N, 32, 32, 1] in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[3] not in (
      1, 3):
    raise ValueError(f"digits must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1 or 3] uint8, got "
                     f"{images.shape}")
  grey = images.astype(np.float32).mean(axis=-1, keepdims=True)
  return grey / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, *, seed: int = 0, epochs: int = 5,
                     batch_size: int = 64, learning_rate: float = 2e-3) -> Any:
  """Trains `DigitClassifier` with Adam on cross-entropy; returns its params.

  Args:
    images: uint8 [N, 32, 32, 1].
    labels: int [N].
    seed: initialisation and batch order (fold_in(key(seed), epoch) per epoch).
  """
  model = DigitClassifier()
  x, y = to_input(images), np.asarray(labels, np.int32)
  params = model.init(jax.random.key(seed), x[:1])["params"]
  steps_per_epoch = len(x) // batch_size
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for epoch in range(epochs):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch),
                                              len(x)))
    for i in range(steps_per_epoch):
      batch = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, x[batch], y[batch])
  return params


def classify(params: Any, images: np.ndarray, batch_size: int = 500
             ) -> tuple[np.ndarray, np.ndarray]:
  """(softmax probabilities [N, 10], features [N, 128]) of uint8 digits [N, 32, 32, C]."""
  apply = jax.jit(lambda p, xb: DigitClassifier().apply({"params": p}, xb))
  x = to_input(images)
  probs, features = [], []
  for start in range(0, len(x), batch_size):
    logits, feats = apply(params, x[start:start + batch_size])
    probs.append(np.asarray(jax.nn.softmax(logits)))
    features.append(np.asarray(feats))
  return np.concatenate(probs), np.concatenate(features)


def build_scorer(seed: int = 0) -> DigitScorer:
  """Trains the classifier on the 4,000 training digits and measures it on the 1,000 others."""
  images, labels = real_digits()
  train, held = held_out_split(labels, seed)
  params = train_classifier(images[train], labels[train], seed=seed)
  held_probs, held_features = classify(params, images[held])
  _, all_features = classify(params, images)
  mu, sigma = fid_statistics(all_features)
  return DigitScorer(
      params=params, reference_mu=mu, reference_sigma=sigma,
      held_out_accuracy=float((held_probs.argmax(-1) == labels[held]).mean()),
      held_out_distance=frechet_distance(*fid_statistics(held_features), mu, sigma))


def default_cache_dir() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxdiff")


def load_scorer(cache_dir: str | None = None) -> DigitScorer:
  """The scorer from `cache_dir` (default ~/.cache/jaxdiff), trained and cached on first use."""
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  path = os.path.join(cache_dir, f"digit_scorer_v{CACHE_VERSION}.msgpack")
  template = {"params": jax.eval_shape(lambda: DigitClassifier().init(
      jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]),
              "reference_mu": np.zeros(FEATURE_DIM),
              "reference_sigma": np.zeros((FEATURE_DIM, FEATURE_DIM)),
              "held_out_accuracy": 0.0, "held_out_distance": 0.0}
  if os.path.exists(path):
    with open(path, "rb") as f:
      state = serialization.from_bytes(template, f.read())
    return DigitScorer(**{k: (float(v) if k.startswith("held") else v) for k, v in state.items()})
  scorer = build_scorer()
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(serialization.to_bytes(dataclasses.asdict(scorer)))
  os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
  return scorer


def score_digits(scorer: DigitScorer, samples: np.ndarray) -> dict:
  """Scores generated digits.

  Args:
    scorer: from `load_scorer`.
    samples: uint8 [N, 32, 32, C], N >= 2.

  Returns:
    {"frechet_distance": to the 5,000 real digits' features,
     "class_coverage": share of the 10 classes that receive at least half of a uniform share
       (5%) of the samples, "class_shares": [10] share of samples predicted as each class,
     "confident": share of samples whose top class has probability >= 0.9 (a clean digit),
     "num_samples"}.
  """
  probs, features = classify(scorer.params, samples)
  shares = np.bincount(probs.argmax(-1), minlength=NUM_CLASSES) / len(probs)
  return {
      "frechet_distance": frechet_distance(*fid_statistics(features), scorer.reference_mu,
                                           scorer.reference_sigma),
      "class_coverage": float((shares >= 0.5 / NUM_CLASSES).mean()),
      "class_shares": shares.tolist(),
      "confident": float((probs.max(-1) >= 0.9).mean()),
      "num_samples": int(len(probs)),
  }
