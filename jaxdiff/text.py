"""Prompt tokenisation for CLIP text encoders, from a Stable Diffusion pipeline's `tokenizer/` folder.

Built on the `tokenizers` library (Rust, a few MB, no torch) rather than on transformers, which
is a test-only dependency of jaxdiff. The pipeline is the one transformers 5 builds for its
`CLIPTokenizer`, and tests check the ids against it:
NFC, whitespace runs -> one space, lowercase; split into CLIP's word / digit / punctuation
pieces; byte-level BPE whose word-final pieces end in `</w>`; special tokens (bos, eos, unk,
pad) matched whole, as transformers' added tokens are.

Each prompt becomes [bos, tokens..., eos, pad...] of exactly `max_length` ids, as diffusers'
StableDiffusionPipeline asks (`padding="max_length", truncation=True`). The pad token is
`<|endoftext|>` in SD 1.x and `!` (id 0) in SD 2.x, read from the folder. Longer prompts are
truncated with a warning that names the dropped text.
"""

import dataclasses
import json
import os
import warnings
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# CLIPTokenizer's defaults, for folders whose configs omit a token.
_SPECIAL_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_CLIP_PIECES = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                r"[^\s\p{L}\p{N}]+")
_WORD_END = "</w>"


@dataclasses.dataclass(frozen=True)
class PromptTokenizer:
  """Turns prompts into fixed-length CLIP token ids: `tokenizer(["a cat"])` -> [1, max_length].

  Build with `load_tokenizer(path)`.
  """
  bpe: Tokenizer  # the `tokenizers` pipeline, without bos/eos post-processing
  max_length: int  # model_max_length: 77 in Stable Diffusion
  bos_id: int
  eos_id: int
  pad_id: int

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """Tokenises, truncates (with a warning) and pads each prompt.

    Args:
      prompts: B strings.

    Returns:
      [B, max_length] int32: [bos, tokens..., eos, pad, ...] per row; at most max_length - 2
      prompt tokens are kept.
    """
    if isinstance(prompts, str):
      raise TypeError("prompts must be a sequence of strings, not one string")
    keep = self.max_length - 2
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    for row, encoding in enumerate(self.bpe.encode_batch(list(prompts),
                                                         add_special_tokens=False)):
      tokens = encoding.ids
      if len(tokens) > keep:
        dropped = self.bpe.decode(tokens[keep:]).replace(_WORD_END, " ").strip()
        warnings.warn(f"prompt {row} is longer than the text encoder's {self.max_length} tokens "
                      f"and was truncated; dropped: {dropped!r}", stacklevel=2)
        tokens = tokens[:keep]
      ids[row, :len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
    return ids


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _special_tokens(path: str) -> dict[str, str]:
  """{bos_token, eos_token, unk_token, pad_token} -> text, special_tokens_map.json first."""
  config = _read_json(os.path.join(path, "tokenizer_config.json"))
  special = _read_json(os.path.join(path, "special_tokens_map.json"))
  tokens = {}
  for name, default in _SPECIAL_DEFAULTS.items():
    value = special.get(name) or config.get(name) or default
    tokens[name] = value["content"] if isinstance(value, dict) else value
  return tokens


def _clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Tokenizer:
  bpe = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                      end_of_word_suffix=_WORD_END, fuse_unk=False, unk_token=unk))
  bpe.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_PIECES), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  bpe.decoder = decoders.ByteLevel()
  return bpe


def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """The BPE vocabulary and merges: vocab.json + merges.txt (transformers 4 and the published
  pipelines), else the `model` of tokenizer.json (what transformers 5's save_pretrained writes)."""
  files = {name: os.path.join(path, name) for name in ("vocab.json", "merges.txt")}
  fast = os.path.join(path, "tokenizer.json")
  if not all(os.path.exists(file) for file in files.values()) and os.path.exists(fast):
    model = _read_json(fast).get("model", {})
    if model.get("type") != "BPE":
      raise ValueError(f"{fast} holds a {model.get('type')!r} model; a CLIP tokenizer is BPE")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges
  for file in files.values():
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file} not found: a CLIP tokenizer folder needs vocab.json and "
                              "merges.txt, or tokenizer.json (as written by save_pretrained)")
  with open(files["merges.txt"], encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f]
  merges = [tuple(line.split(" ")) for line in lines
            if line and not line.startswith("#version")]
  return _read_json(files["vocab.json"]), merges


def load_tokenizer(path: str) -> PromptTokenizer:
  """Reads a CLIP tokenizer folder: vocab.json + merges.txt or tokenizer.json, and
  tokenizer_config.json.

  Raises:
    FileNotFoundError: naming a missing vocab.json or merges.txt (when there is no
      tokenizer.json either).
    ValueError: a special token missing from the vocabulary, or no model_max_length.
  """
  vocab, merges = _vocab_and_merges(path)
  tokens = _special_tokens(path)
  missing = sorted({name for name, text in tokens.items() if text not in vocab})
  if missing:
    raise ValueError(f"tokenizer special tokens {missing} ({[tokens[n] for n in missing]}) are "
                     f"not in the vocabulary of {path}")
  max_length = _read_json(os.path.join(path, "tokenizer_config.json")).get("model_max_length")
  if not isinstance(max_length, int) or not 2 < max_length < 10**6:
    raise ValueError(f"tokenizer_config.json model_max_length={max_length!r} must be the text "
                     "encoder's context length (77 for CLIP)")
  bpe = _clip_bpe(vocab, merges, tokens["unk_token"])
  bpe.add_special_tokens([AddedToken(text, special=True) for text in set(tokens.values())])
  return PromptTokenizer(bpe, max_length, vocab[tokens["bos_token"]], vocab[tokens["eos_token"]],
                         vocab[tokens["pad_token"]])


def encode_texts(tokenizer: PromptTokenizer, encoder, encoder_params: Any, texts: Sequence[str],
                 *, batch_size: int = 64) -> np.ndarray:
  """Runs a text encoder once over `texts` (StableDiffusionPipeline.encode_prompt, no clip skip).

  Texts go through the encoder in chunks of `batch_size` (the last one padded), so one
  compilation serves any number of texts.

  Args:
    tokenizer: prompts [P] -> int token ids [P, L] (`load_tokenizer`; it truncates over-long
      texts with a warning).
    encoder: a text encoder whose output has a `context` [P, L, D] (`CLIPTextEncoder`).
    encoder_params: its parameters.
    texts: P >= 1 strings.
    batch_size: texts per encoder call.

  Returns:
    float32 [P, L, D]: the context each text gives the U-Net.
  """
  import jax  # pylint: disable=g-import-not-at-top  (tokenising alone needs no JAX)
  if not len(texts):
    raise ValueError("need at least one text to encode")
  ids = tokenizer(list(texts))
  chunk = min(batch_size, len(ids))
  padded = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % chunk, axis=0)])
  run = jax.jit(lambda p, i: encoder.apply({"params": p}, i).context)
  contexts = [np.asarray(run(encoder_params, padded[start:start + chunk]), np.float32)
              for start in range(0, len(padded), chunk)]
  return np.concatenate(contexts)[:len(ids)]
