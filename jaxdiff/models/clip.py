"""The CLIP text encoder (Radford et al. 2021) in the layout of transformers' `CLIPTextModel`.

Token + learned position embeddings, `num_layers` pre-LayerNorm transformer layers with causal
self-attention (GPT-2 style: token i sees tokens <= i), a final LayerNorm. The pooled output is
the final-normed state at the end-of-text token. transformers 5 picks that token in two ways,
and so does this module (`eos_token_id`):
- `eos_token_id == 2` (configs written before transformers PR #24773): the position of the
  largest token id, which is the end-of-text token in CLIP's vocabulary;
- otherwise: the first position holding `eos_token_id` (padding may repeat that id).

What Stable Diffusion feeds its U-Net (the `context` output):
- SD 1.x: `last_hidden_state`, the final-normed output of the last layer.
- SD 2.x: OpenCLIP's penultimate layer. diffusers' SD 2 checkpoints already drop the last layer
  (their text_encoder config has num_hidden_layers=23), so again `last_hidden_state`.
- diffusers' `clip_skip=k` (StableDiffusionPipeline.encode_prompt): hidden_states[-(k + 1)],
  the output of layer num_layers - k, *with* the final LayerNorm applied. Pass `clip_skip=k`.
  `hidden_states` holds the raw (un-normed) states, as transformers' `output_hidden_states`.

Precision: matmuls run in `dtype`; attention softmax and the final LayerNorm in float32; every
output is float32.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.layers import Dense
from jaxdiff.models.transformer import Attention, layer_norm

# transformers' ACT2FN names -> functions.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}

# OpenAI's CLIP ViT-L/14 text tower (Stable Diffusion 1.x): 123.1M parameters.
CLIP_TEXT_SIZES = {
    "clip-vit-l-14": dict(vocab_size=49408, max_positions=77, width=768, num_layers=12,
                          num_heads=12, mlp_dim=3072, activation="quick_gelu"),
    "clip-tiny": dict(vocab_size=1000, max_positions=16, width=32, num_layers=2, num_heads=4,
                      mlp_dim=64, activation="quick_gelu"),
}


class CLIPTextOutput(NamedTuple):
  """Outputs of `CLIPTextEncoder`, all float32."""
  last_hidden_state: Any  # [B, L, D] final LayerNorm of the last layer's output
  pooled_output: Any  # [B, D] last_hidden_state at the end-of-text token
  hidden_states: tuple  # num_layers + 1 x [B, L, D]: embeddings, then each layer (no final norm)
  context: Any  # [B, L, D] final LayerNorm of hidden_states[-(clip_skip + 1)]: the U-Net input


class EncoderLayer(nn.Module):
  """x + attn(norm_1(x)), then + fc_2(act(fc_1(norm_2(.)))), causal self-attention."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """x: [B, L, D], mask: [B, L] bool (False = padding) or None -> [B, L, D]."""
    norm = lambda name: layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)
    dense = lambda features, name: Dense(features, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    x = x + Attention(self.num_heads, qkv_bias=True, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="attn")(
                          norm("norm_1")(x), mask=mask, is_causal=True)
    h = ACTIVATIONS[self.activation](dense(self.mlp_dim, "fc_1")(norm("norm_2")(x)))
    return x + dense(x.shape[-1], "fc_2")(h)


class CLIPTextEncoder(nn.Module):
  """transformers' CLIPTextModel: input_ids [B, L] -> `CLIPTextOutput`.

  `jaxdiff.convert.clip` maps a CLIPTextConfig onto these fields and loads its weights.
  """
  vocab_size: int = 49408
  max_positions: int = 77  # max_position_embeddings; L may be shorter
  width: int = 768  # hidden_size
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072  # intermediate_size
  activation: str = "quick_gelu"  # one of ACTIVATIONS
  norm_eps: float = 1e-5
  eos_token_id: int = 49407  # 2 = legacy configs: pool at the largest token id
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None, *,
               clip_skip: int = 0) -> CLIPTextOutput:
    """Encodes token ids.

    Args:
      input_ids: [B, L] int token ids, L <= max_positions; each row holds an end-of-text token.
      attention_mask: [B, L], 1 for tokens and 0 for padding keys, or None (Stable Diffusion
        passes none: with causal attention, padding after the end-of-text token changes
        nothing before it).
      clip_skip: 0 <= clip_skip < num_layers; `context` is built from the output of layer
        num_layers - clip_skip (diffusers' `clip_skip`).

    Returns:
      CLIPTextOutput (see its fields).
    """
    self._check_input(input_ids, clip_skip)
    length = input_ids.shape[1]
    embed = lambda rows, name: nn.Embed(rows, self.width, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    h = embed(self.vocab_size, "token_embed")(input_ids)
    h = h + embed(self.max_positions, "position_embed")(jnp.arange(length))[None]
    hidden_states = [h]
    for i in range(self.num_layers):
      h = EncoderLayer(self.num_heads, self.mlp_dim, self.activation, self.norm_eps,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"layer_{i}")(h, attention_mask)
      hidden_states.append(h)
    final_norm = layer_norm(self.norm_eps, jnp.float32, self.param_dtype, "final_norm")
    last = final_norm(h.astype(jnp.float32))
    context = last if clip_skip == 0 else final_norm(
        hidden_states[-1 - clip_skip].astype(jnp.float32))
    if self.eos_token_id == 2:
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:
      eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last, pooled, tuple(s.astype(jnp.float32) for s in hidden_states),
                          context)

  def _check_input(self, input_ids: jnp.ndarray, clip_skip: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] > self.max_positions:
      raise ValueError(f"input_ids must be [B, L] with L <= max_positions={self.max_positions}; "
                       f"got shape {input_ids.shape}")
    if not 0 <= clip_skip < self.num_layers:
      raise ValueError(f"clip_skip={clip_skip} must be in [0, num_layers={self.num_layers})")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not supported; "
                       f"choose one of {sorted(ACTIVATIONS)}")
