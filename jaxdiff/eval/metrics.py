"""FID, KID, Inception Score and precision/recall from Inception features.

Conventions follow torch-fidelity 0.4 (the reference these numbers are compared with): FID
with the trace of the covariance square root (computed stably, see `frechet_distance`), KID
as the unbiased MMD^2 with the cubic polynomial kernel over random subsets, IS from the
bias-free logits with a seeded shuffle and 10 splits, precision/recall with k = 3 nearest
neighbours. Statistics are float64 NumPy; precision/recall distances run on device in blocks.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SEED = 2020  # torch-fidelity's default rng seed for KID subsets and the IS shuffle.


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of features [N, D] -> (mu [D], sigma [D, D]) in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (rounding negatives clipped to 0)."""
  eigenvalues, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.maximum(eigenvalues, 0.0))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
  sigma1 sigma2 is similar to the PSD matrix A sigma2 A with A = sigma1^(1/2), so the trace of
  its square root is the sum of square roots of A sigma2 A's eigenvalues. Two symmetric
  eigendecompositions replace torch-fidelity's general `eigvals(sigma1 @ sigma2)`: the same
  value up to rounding (its complex or negative rounding eigenvalues also contribute 0),
  several times faster at 2048 dimensions, and stable for rank-deficient covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  root1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
  inner = root1 @ sigma2 @ root1
  trace_sqrt = np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D] and [N2, D]."""
  return frechet_distance(*fid_statistics(features1), *fid_statistics(features2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x, y) = (x.y / D + 1)^3, KID's kernel (Binkowski et al. 2018). [N, D], [M, D] -> [N, M]."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 estimate between equal-size sets x, y [m, D] with the cubic kernel.

  (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1)) - 2 mean_{i, j} k(x_i, y_j).
  """
  m = len(x)
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  off_diagonal = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
  return float(off_diagonal / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1, features2, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = DEFAULT_SEED) -> dict:
  """KID: mean and std of the unbiased MMD^2 over random subsets (without replacement).

  Subsets are drawn as torch-fidelity draws them (one `RandomState(seed)`, alternating the two
  sets). `subset_size` is capped at the smaller set's size; the size used is returned.

  Returns:
    {"kid_mean", "kid_std", "kid_subset_size"}.
  """
  features1 = np.asarray(features1, np.float64)
  features2 = np.asarray(features2, np.float64)
  subset_size = min(subset_size, len(features1), len(features2))
  if subset_size < 2:
    raise ValueError("KID needs at least 2 images in each set")
  rng = np.random.RandomState(seed)
  values = np.empty(num_subsets)
  for i in range(num_subsets):
    x = features1[rng.choice(len(features1), subset_size, replace=False)]
    y = features2[rng.choice(len(features2), subset_size, replace=False)]
    values[i] = mmd2_unbiased(x, y)
  return {"kid_mean": float(values.mean()), "kid_std": float(values.std()),
          "kid_subset_size": subset_size}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True,
                    seed: int = DEFAULT_SEED) -> dict:
  """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split.

  Args:
    logits: [N, C], the bias-free Inception logits (`logits_unbiased`), as the original code.
    splits: images are cut into this many contiguous chunks (after a seeded shuffle).

  Returns:
    {"inception_score_mean", "inception_score_std"} over the splits.
  """
  logits = np.asarray(logits, np.float64)
  n = len(logits)
  if n < splits:
    raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images")
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(n)]
  log_p = _log_softmax(logits)
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    chunk = slice(i * n // splits, (i + 1) * n // splits)
    log_marginal = np.log(p[chunk].mean(axis=0, keepdims=True))
    kl = (p[chunk] * (log_p[chunk] - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return {"inception_score_mean": float(np.mean(scores)),
          "inception_score_std": float(np.std(scores))}


@jax.jit
def _squared_distances(a, b):
  """[n, D], [m, D] -> [n, m] squared Euclidean distances (clipped at 0 against rounding)."""
  a_norm = jnp.sum(a * a, axis=1)[:, None]
  b_norm = jnp.sum(b * b, axis=1)[None, :]
  cross = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(a_norm + b_norm - 2.0 * cross, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_block(block, features, k):
  # The point itself is at distance 0, so the k-th neighbour is the (k + 1)-th smallest.
  return -jax.lax.top_k(-_squared_distances(block, features), k + 1)[0][:, -1]


@jax.jit
def _covered_block(block, features, radii):
  return jnp.any(_squared_distances(block, features) <= radii[None, :], axis=1)


def _blocks(x, block_size):
  return [x[i:i + block_size] for i in range(0, len(x), block_size)]


def _manifold_coverage(queries, features, k, block_size):
  """Fraction of queries inside the k-NN manifold of `features` (union of k-NN balls)."""
  features = jnp.asarray(features, jnp.float32)
  radii = jnp.concatenate([_kth_neighbour_block(b, features, k)
                           for b in _blocks(features, block_size)])
  covered = [np.asarray(_covered_block(b, features, radii))
             for b in _blocks(jnp.asarray(queries, jnp.float32), block_size)]
  return float(np.concatenate(covered).mean())


def precision_recall(real_features, fake_features, k: int = 3,
                     block_size: int = 2048) -> dict:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Precision: fraction of generated samples within the k-NN radius of some real sample;
  recall: fraction of real samples within the k-NN radius of some generated sample.
  A point on a ball's boundary counts as inside (`<=`), as in torch-fidelity.

  Args:
    real_features: [N, D]; fake_features: [M, D]; both need more than k points.

  Returns:
    {"precision", "recall"}.
  """
  if min(len(real_features), len(fake_features)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
  return {"precision": _manifold_coverage(fake_features, real_features, k, block_size),
          "recall": _manifold_coverage(real_features, fake_features, k, block_size)}
