"""Per-example randomness that does not depend on how a batch is split over devices."""

import jax


def per_example_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """`fold_in(key, i)` for each global example index i.

  Args:
    key: one typed PRNG key.
    indices: int [B] global indices (of an example in the step's batch, or of a sample).

  Returns:
    [B] typed keys; key i depends only on `key` and `indices[i]`.
  """
  return jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
