"""diffusers `DiTTransformer2DModel` weights -> jaxdiff `DiT` params (NumPy only).

diffusers differs from the paper's code in ways the converted module must reproduce:
- every block's AdaLayerNormZero holds its own copy of the timestep + label embedder
  (`norm1.emb`), and the final layer reads block 0's; jaxdiff shares one embedder, so all
  copies must be identical (they are in published checkpoints);
- timestep frequencies use `downscale_freq_shift=1` (original DiT: 0);
- the LayerNorm before the MLP uses the config's `norm_eps` (1e-5 by default; DiT: 1e-6);
- positions are rescaled to the training grid (`base_size = sample_size // patch_size`);
- the label table always has the null row (its class dropout is fixed at 0.1).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import common
from jaxdiff.models.dit import DiT

# Fields that only change how the module computes, not which parameters it has.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_blocks")
# diffusers per-block embedder Linear -> jaxdiff `time_embed` Dense.
_EMBEDDER = {
    "norm1.emb.timestep_embedder.linear_1": "dense_1",
    "norm1.emb.timestep_embedder.linear_2": "dense_2",
}
_LABEL_TABLE = "norm1.emb.class_embedder.embedding_table.weight"
_BLOCK_DENSE = {
    "norm1.linear": ("modulation",),
    "attn1.to_out.0": ("attn", "out"),
    "ff.net.0.proj": ("mlp", "dense_in"),
    "ff.net.2": ("mlp", "dense_out"),
}


def module_fields(config: dict) -> dict:
  """DiT field values equivalent to a diffusers DiTTransformer2DModel config.

  Raises:
    ValueError: naming the config field whose value jaxdiff's DiT does not implement.
  """
  get = config.get
  # Each is also diffusers' default, so a missing key is supported.
  required = {
      "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
      "attention_bias": True, "norm_elementwise_affine": False,
  }
  for key, value in required.items():
    if get(key, value) != value:
      raise ValueError(
          f"DiT config {key}={config[key]!r} is not supported; jaxdiff's DiT implements "
          f"{key}={value!r}")
  num_classes = get("num_embeds_ada_norm", 1000)
  if not num_classes or num_classes < 1:
    raise ValueError(f"DiT config num_embeds_ada_norm={num_classes!r} must be a class count >= 1")
  in_channels = get("in_channels", 4)
  out_channels = get("out_channels", None) or in_channels
  if out_channels not in (in_channels, 2 * in_channels):
    raise ValueError(
        f"DiT config out_channels={out_channels} is not supported: it must equal in_channels "
        f"({in_channels}) or twice it (learned variance)")
  patch_size, sample_size = get("patch_size", 2), get("sample_size", 32)
  if sample_size % patch_size:
    raise ValueError(
        f"DiT config sample_size={sample_size} is not divisible by patch_size={patch_size}")
  heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
  return dict(
      hidden_size=heads * head_dim, depth=get("num_layers", 28), num_heads=heads,
      patch_size=patch_size, mlp_ratio=4.0, num_classes=num_classes, class_dropout_prob=0.1,
      learn_sigma=out_channels == 2 * in_channels, conditioning="adaln_zero",
      time_freq_shift=1.0, mlp_norm_eps=get("norm_eps", 1e-5),
      pos_embed_base_size=sample_size // patch_size)


def _shared_embedder(state: dict, depth: int) -> dict:
  """Pops every block's embedder copy, checks they equal block 0's, returns jaxdiff params."""
  suffixes = [f"{name}.{kind}" for name in _EMBEDDER for kind in ("weight", "bias")]
  suffixes.append(_LABEL_TABLE)
  for suffix in suffixes:
    reference = state[f"transformer_blocks.0.{suffix}"]
    for i in range(1, depth):
      copy = state.pop(f"transformer_blocks.{i}.{suffix}")
      if not np.array_equal(copy, reference):
        raise ValueError(
            f"transformer_blocks.{i}.{suffix} differs from transformer_blocks.0.{suffix}: "
            "jaxdiff's DiT shares one timestep/label embedder across blocks (as in the DiT "
            "paper), so every block's norm1.emb must hold the same weights")
  params = {"time_embed": {}}
  for name, dense_name in _EMBEDDER.items():
    params["time_embed"][dense_name] = common.pop_dense(state, f"transformer_blocks.0.{name}")
  params["label_embed"] = {"embedding": state.pop(f"transformer_blocks.0.{_LABEL_TABLE}")}
  return params


def _block(state: dict, i: int) -> dict:
  """Params of block i: fused q|k|v (timm layout), output, MLP and adaLN modulation."""
  prefix = f"transformer_blocks.{i}"
  block = {}
  for name, path in _BLOCK_DENSE.items():
    node = block
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = common.pop_dense(state, f"{prefix}.{name}")
  qkv = [common.pop_dense(state, f"{prefix}.attn1.to_{x}") for x in "qkv"]
  block["attn"]["qkv"] = {
      "kernel": np.concatenate([d["kernel"] for d in qkv], axis=1),
      "bias": np.concatenate([d["bias"] for d in qkv], axis=0),
  }
  return block


def _check_layout(module: DiT, params: dict, config: dict):
  """Raises ValueError unless params have exactly the module's parameter names and shapes."""
  size = config.get("sample_size", 32)
  x = jnp.zeros((1, size, size, config.get("in_channels", 4)), jnp.float32)
  label = jnp.zeros((1,), jnp.int32)
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), x, label, label))["params"]
  common.check_shapes(expected, params, "converted DiT params")


def convert(config: dict, state: dict[str, np.ndarray], **module_overrides):
  """Converts a diffusers DiTTransformer2DModel (config + state dict) to (DiT module, params).

  Args:
    config: the model's config.json contents.
    state: {torch parameter name: array}; not modified.
    **module_overrides: DiT fields to set; only dtype, param_dtype, remat and scan_blocks may
      differ from the checkpoint's architecture.

  Returns:
    (module, params): `module.apply({"params": params}, x_nhwc, t, y)` equals the diffusers
    output transposed to NHWC. With scan_blocks, block params are stacked along axis 0.

  Raises:
    ValueError: unsupported config values, untied per-block embedders, missing or
      unexpected weights, or an override that changes the architecture.
  """
  fields = module_fields(config)
  for key, value in module_overrides.items():
    if key in fields and key not in _RUNTIME_FIELDS and value != fields[key]:
      raise ValueError(
          f"override {key}={value!r} contradicts the checkpoint ({key}={fields[key]!r})")
  module = DiT(**{**fields, **module_overrides})
  state = dict(state)
  state.pop("pos_embed.pos_embed", None)  # a fixed buffer that jaxdiff recomputes
  try:
    params = _shared_embedder(state, module.depth)
    blocks = [_block(state, i) for i in range(module.depth)]
    params["patch_embed"] = {
        "kernel": common.flax_kernel(state.pop("pos_embed.proj.weight")),
        "bias": state.pop("pos_embed.proj.bias"),
    }
    params["final_layer"] = {
        "modulation": common.pop_dense(state, "proj_out_1"), "dense": common.pop_dense(state, "proj_out_2")}
  except KeyError as missing:
    raise ValueError(f"DiT checkpoint lacks the weight {missing}") from None
  common.check_consumed(state, "the DiT checkpoint")
  if module.scan_blocks:
    params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  else:
    params.update({f"block_{i}": block for i, block in enumerate(blocks)})
  _check_layout(module, params, config)
  params = jax.tree.map(lambda a: jnp.asarray(a, module.param_dtype), params)
  return module, params


__all__ = ["convert", "module_fields"]
