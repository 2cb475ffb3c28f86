"""CLIPTextEncoder and its import: equal to transformers' CLIPTextModel (CPU torch) to 1e-4.

Tiny random CLIPTextModels with every weight perturbed, saved with `save_pretrained` and read
back with `load_clip_text_encoder`: last hidden state, pooled output (both end-of-text
conventions), every hidden state, diffusers' clip_skip embedding, padding masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from jaxdiff.convert import clip as convert_clip
from jaxdiff.convert import load_clip_text_encoder
from jaxdiff.models.clip import CLIP_TEXT_SIZES, CLIPTextEncoder

VOCAB, BOS, LENGTH = 64, 62, 10
# name -> (config fields, the end-of-text id written in the rows).
CONFIGS = {
    # quick_gelu; eos_token_id a real id, below BOS: pooling at the largest id would be wrong.
    "quick_gelu": (dict(hidden_act="quick_gelu", num_hidden_layers=3, eos_token_id=55), 55),
    # Legacy eos_token_id=2: pools at the largest id (63 here); exact gelu; a large eps.
    "gelu_legacy_eos": (dict(hidden_act="gelu", num_hidden_layers=2, eos_token_id=2,
                             layer_norm_eps=0.3), 63),
}


def _save_random_clip(path, overrides: dict, seed: int = 0) -> CLIPTextModel:
  config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                          num_attention_heads=4, max_position_embeddings=12, bos_token_id=BOS,
                          pad_token_id=0, **overrides)
  torch.manual_seed(seed)
  model = CLIPTextModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _token_ids(eos: int) -> np.ndarray:
  """Rows [bos, words..., eos, padding...]; padding repeats eos in row 0 (as SD 1.x pads)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, size=(3, LENGTH))
  for row, (words, pad) in enumerate([(3, eos), (8, 0), (5, 0)]):
    ids[row, 0], ids[row, words + 1] = BOS, eos
    ids[row, words + 2:] = pad
  return ids


def _close(got, want):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(tmp_path, name):
  overrides, eos = CONFIGS[name]
  model = _save_random_clip(tmp_path, overrides)
  ids = _token_ids(eos)
  with torch.no_grad():
    reference = model(torch.from_numpy(ids), output_hidden_states=True)
    skipped = model.final_layer_norm(reference.hidden_states[-2])  # diffusers' clip_skip=1

  module, params = load_clip_text_encoder(str(tmp_path))
  out = jax.jit(module.apply, static_argnames="clip_skip")(
      {"params": params}, jnp.asarray(ids), clip_skip=1)

  assert len(out.hidden_states) == len(reference.hidden_states) == module.num_layers + 1
  _close(out.last_hidden_state, reference.last_hidden_state)
  _close(out.pooled_output, reference.pooler_output)
  for got, want in zip(out.hidden_states, reference.hidden_states):
    _close(got, want)
  _close(out.context, skipped)
  assert out.context.dtype == out.pooled_output.dtype == jnp.float32
  # Rows with different end-of-text positions pool different states.
  assert np.abs(np.asarray(out.pooled_output[0] - out.pooled_output[1])).max() > 0.1


def test_attention_mask_matches_transformers(tmp_path):
  overrides, eos = CONFIGS["quick_gelu"]
  model = _save_random_clip(tmp_path, overrides, seed=1)
  ids = _token_ids(eos)
  mask = (np.arange(LENGTH)[None] <= np.array([[4], [9], [6]])).astype(np.int64)
  mask[1, 2] = 0  # a masked key in the middle changes the states after it
  with torch.no_grad():
    reference = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  module, params = load_clip_text_encoder(str(tmp_path))
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  keep = mask.astype(bool)  # states at masked queries are not meaningful in either framework
  _close(np.asarray(out.last_hidden_state)[keep], reference.last_hidden_state.numpy()[keep])
  _close(out.pooled_output, reference.pooler_output)


def test_vit_l_14_preset_has_123m_parameters():
  module = CLIPTextEncoder(**CLIP_TEXT_SIZES["clip-vit-l-14"])
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  with torch.device("meta"):
    reference = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                             num_attention_heads=12, projection_dim=768))
  count = sum(a.size for a in jax.tree.leaves(abstract))
  assert count == sum(p.numel() for p in reference.parameters())
  assert abs(count - 123.06e6) < 0.01e6


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "relu"),
    ("architectures", ["CLIPTextModelWithProjection"]),
    ("eos_token_id", [2, 3]),
])
def test_unsupported_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    convert_clip.clip_text_fields({"architectures": ["CLIPTextModel"], field: value})


def test_bad_inputs_and_weights_are_errors(tmp_path):
  model = _save_random_clip(tmp_path, CONFIGS["quick_gelu"][0])
  state = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
  config = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "max_position_embeddings": 12, "num_hidden_layers": 3}
  module, params = convert_clip.convert(config, state)  # the `text_model.` prefix is optional
  with pytest.raises(ValueError, match="lacks the weight"):
    convert_clip.convert(config, {k: v for k, v in state.items() if "layers.2.mlp.fc1" not in k})
  with pytest.raises(ValueError, match="does not use"):
    convert_clip.convert(config, {**state, "text_projection.weight": np.zeros((4, 32))})
  with pytest.raises(ValueError, match="max_positions"):
    module.apply({"params": params}, jnp.zeros((1, 13), jnp.int32))
  with pytest.raises(ValueError, match="clip_skip"):
    module.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), clip_skip=3)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_clip_text_encoder(str(tmp_path / "missing"))
