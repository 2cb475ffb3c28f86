"""transformers `CLIPTextModel` -> `jaxdiff.models.clip.CLIPTextEncoder` (config + NumPy weights).

Reads a Stable Diffusion pipeline's `text_encoder/` folder (config.json + model.safetensors).
Weight names may carry the `text_model.` prefix (transformers 4 and the published SD
checkpoints) or not (transformers 5); the `position_ids` buffer some checkpoints hold is
recomputed, not loaded.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import common
from jaxdiff.models.clip import ACTIVATIONS, CLIPTextEncoder

# CLIPTextConfig defaults for configs that omit fields.
_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_LAYER_NAMES = {"layer_norm1": ("norm_1",), "layer_norm2": ("norm_2",),
                "self_attn.q_proj": ("attn", "query"), "self_attn.k_proj": ("attn", "key"),
                "self_attn.v_proj": ("attn", "value"), "self_attn.out_proj": ("attn", "out"),
                "mlp.fc1": ("fc_1",), "mlp.fc2": ("fc_2",)}


def clip_text_fields(config: dict) -> dict:
  """Maps a transformers CLIPTextConfig dict onto `CLIPTextEncoder` field values.

  Raises:
    ValueError: naming the config field jaxdiff does not implement.
  """
  architectures = config.get("architectures") or ["CLIPTextModel"]
  if architectures != ["CLIPTextModel"]:
    raise ValueError(f"text encoder config architectures={architectures!r} is not supported; "
                     "jaxdiff loads ['CLIPTextModel'] (Stable Diffusion 1.x / 2.x)")
  get = lambda key: config[key] if config.get(key) is not None else _DEFAULTS[key]
  if get("hidden_act") not in ACTIVATIONS:
    raise ValueError(f"text encoder config hidden_act={get('hidden_act')!r} is not supported; "
                     f"choose one of {sorted(ACTIVATIONS)}")
  eos = get("eos_token_id")
  if not isinstance(eos, int):
    raise ValueError(f"text encoder config eos_token_id={eos!r} must be one int")
  return dict(vocab_size=get("vocab_size"), max_positions=get("max_position_embeddings"),
              width=get("hidden_size"), num_layers=get("num_hidden_layers"),
              num_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"),
              activation=get("hidden_act"), norm_eps=float(get("layer_norm_eps")),
              eos_token_id=eos)


def convert_state(state: dict[str, np.ndarray], num_layers: int) -> dict:
  """Renames and transposes a CLIPTextModel state dict into nested Flax params (NumPy)."""
  state = {k.removeprefix("text_model."): v for k, v in state.items()}
  state.pop("embeddings.position_ids", None)
  try:
    params = {
        "token_embed": {"embedding": state.pop("embeddings.token_embedding.weight")},
        "position_embed": {"embedding": state.pop("embeddings.position_embedding.weight")},
        "final_norm": common.pop_norm(state, "final_layer_norm"),
    }
    for i in range(num_layers):
      for torch_name, path in _LAYER_NAMES.items():
        prefix = f"encoder.layers.{i}.{torch_name}"
        pop = common.pop_norm if path[0].startswith("norm") else common.pop_dense
        common.nested_set(params, (f"layer_{i}", *path), pop(state, prefix))
  except KeyError as missing:
    raise ValueError(f"CLIPTextModel checkpoint lacks the weight {missing}") from None
  common.check_consumed(state, "the CLIPTextModel checkpoint")
  return params


def convert(config: dict, state: dict[str, np.ndarray], **module_overrides):
  """Builds (CLIPTextEncoder, params) from a CLIPTextConfig dict and state dict.

  Args:
    config: the parsed config.json of the text encoder folder.
    state: {torch parameter name: array} from model.safetensors.
    **module_overrides: CLIPTextEncoder fields to change (dtype, param_dtype).

  Returns:
    (module, params): `module.apply({"params": params}, input_ids)` equals CLIPTextModel's
    outputs (see `CLIPTextOutput`).
  """
  fields = clip_text_fields(config)
  allowed = set(CLIPTextEncoder.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(module_overrides) - allowed)
  if unknown:
    raise ValueError(f"CLIPTextEncoder has no field(s) {unknown}; allowed: {sorted(allowed)}")
  module = CLIPTextEncoder(**{**fields, **module_overrides})
  params = convert_state(state, module.num_layers)
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
  common.check_shapes(expected, params, "converted CLIPTextModel weights")
  return module, jax.tree.map(lambda a: jnp.asarray(a, module.param_dtype), params)


def load_clip_text_encoder(path: str, **module_overrides):
  """Loads a transformers CLIPTextModel folder (a pipeline's `text_encoder/`) as (module, params).

  Raises:
    FileNotFoundError: naming config.json or model.safetensors when missing.
    ValueError: unsupported config values or weights that do not fit.
  """
  config, state = common.read_diffusers_folder(path, weights_name="model.safetensors")
  return convert(config, state, **module_overrides)


__all__ = ["clip_text_fields", "convert", "convert_state", "load_clip_text_encoder"]
