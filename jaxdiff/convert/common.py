"""What every weight importer shares: reading a diffusers folder, PyTorch -> Flax layouts, and the
check that converted parameters fit the module exactly.

Layouts: PyTorch stores a conv kernel as [O, I, kh, kw] and a Linear weight as [O, I]; Flax wants
[kh, kw, I, O] and [I, O]. A GroupNorm / LayerNorm `weight` is Flax's `scale`, unchanged.
"""

import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from safetensors.numpy import load_file


def read_diffusers_folder(path: str, weights_name: str = "diffusion_pytorch_model.safetensors"
                          ) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (config dict, {torch parameter name: float32 array}) of a model folder.

  Args:
    path: a folder written by `save_pretrained` (config.json + safetensors weights).
    weights_name: the weights file (diffusers: diffusion_pytorch_model.safetensors;
      transformers: model.safetensors).

  Raises:
    FileNotFoundError: naming the missing file.
  """
  config_path = os.path.join(path, "config.json")
  weights_path = os.path.join(path, weights_name)
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise FileNotFoundError(
          f"{p} not found: a model folder needs config.json and {weights_name} "
          "(as written by save_pretrained)")
  with open(config_path) as f:
    config = json.load(f)
  state = {k: np.asarray(v, np.float32) for k, v in load_file(weights_path).items()}
  return config, state


def flax_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch conv [O, I, kh, kw] or Linear [O, I] weight in Flax's layout ([kh, kw, I, O] or
  [I, O])."""
  if weight.ndim == 4:
    return weight.transpose(2, 3, 1, 0)
  if weight.ndim == 2:
    return weight.T
  raise ValueError(f"expected a 2-D or 4-D torch weight, got shape {weight.shape}")


def pop_dense(state: dict[str, np.ndarray], prefix: str, *, bias: bool = True) -> dict:
  """Pops torch `prefix.weight` (and `.bias`) as a Flax Dense/Conv {kernel[, bias]}."""
  params = {"kernel": flax_kernel(state.pop(f"{prefix}.weight"))}
  if bias:
    params["bias"] = state.pop(f"{prefix}.bias")
  return params


def pop_norm(state: dict[str, np.ndarray], prefix: str) -> dict:
  """Pops a torch GroupNorm / LayerNorm (`weight`, `bias`) as Flax {scale, bias}."""
  return {"scale": state.pop(f"{prefix}.weight"), "bias": state.pop(f"{prefix}.bias")}


def nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  """tree[path[0]][path[1]]...[path[-1]] = value, creating the inner dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_leaf(path: tuple[str, ...], key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(Flax leaf name, array) of a torch tensor: `bias` as is, a norm's `weight` as `scale`, any
  other weight as a Flax `kernel`."""
  if key.endswith(".bias"):
    return "bias", value
  if path[-1].startswith("norm"):
    return "scale", value
  return "kernel", flax_kernel(value)


def convert_named_state(state: Mapping[str, np.ndarray],
                        flax_path: Callable[[str], tuple[str, ...]], what: str,
                        flax_leaf: Callable[..., tuple[str, np.ndarray]] = torch_leaf) -> dict:
  """Renames and transposes a torch state dict into nested Flax params (NumPy).

  Args:
    state: {torch parameter name: array}.
    flax_path: torch parameter name -> path of the Flax module holding it; an empty path or a
      "?" in it means the weight has no counterpart.
    what: names the checkpoint in the error, e.g. "UNet2DModel".
    flax_leaf: (path, torch name, array) -> (Flax leaf name, array in Flax layout).

  Raises:
    ValueError: weights without a counterpart, counted and named.
  """
  params, unmapped = {}, []
  for key, value in state.items():
    path = flax_path(key)
    if not path or "?" in path:
      unmapped.append(key)
      continue
    leaf, array = flax_leaf(path, key, np.asarray(value))
    nested_set(params, (*path, leaf), array)
  if unmapped:
    raise ValueError(f"{len(unmapped)} {what} weights have no jaxdiff counterpart, "
                     f"e.g. {sorted(unmapped)[:5]}")
  return params


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(expected: Any, got: Any, what: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` unless `got` has exactly the leaf names and shapes of `expected`.

  Args:
    expected: the module's own parameters (usually `jax.eval_shape` of its init).
    got: the converted parameters.
    what: names the checkpoint in the message, e.g. "UNet2DModel weights".
    error: the exception type raised.
  """
  want, have = _shapes(expected), _shapes(got)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or wrong:
    raise error(
        f"{what} do not fit the module: missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"wrong shapes {[(k, have[k], want[k]) for k in wrong[:5]]} "
        f"({len(missing)}/{len(unexpected)}/{len(wrong)} in all)")


def check_consumed(state: Mapping[str, np.ndarray], what: str) -> None:
  """Raises ValueError if weights were left over after conversion (popped dicts)."""
  if state:
    raise ValueError(f"{what} has {len(state)} weights jaxdiff does not use, "
                     f"e.g. {sorted(state)[:8]}")
