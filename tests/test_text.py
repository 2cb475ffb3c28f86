"""Prompt tokenisation (jaxdiff/text.py): ids equal transformers' CLIPTokenizer on a tiny folder.

The test writes the folder itself, in the layout of a Stable Diffusion pipeline's `tokenizer/`
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json): CLIP's 256 byte-level
symbols with and without `</w>`, a few merges, and the two special tokens.
"""

import json
import warnings

import numpy as np
import pytest
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from jaxdiff.text import load_tokenizer

MAX_LENGTH = 12
MERGES = ["p h", "o t", "ph ot", "phot o</w>", "o f</w>", "c a", "ca t</w>", "t h", "th e</w>"]
PROMPTS = [
    "a photo of a cat",
    "A  PHOTO\tof the Cat!!",  # case, whitespace runs, punctuation
    "café 42 <|endoftext|> x",  # bytes beyond ASCII, digits, a special token in the text
    "",
    "the cat's photo, of a cat!",  # fits exactly: 10 tokens = MAX_LENGTH - 2
]


def _write_folder(path, pad_token: str) -> None:
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  words = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in MERGES]
  words += ["<|startoftext|>", "<|endoftext|>"]
  with open(path / "vocab.json", "w") as f:
    json.dump({w: i for i, w in enumerate(words)}, f)
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": pad_token}
  (path / "special_tokens_map.json").write_text(json.dumps(special))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
       "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>"}}))


# SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0).
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_ids_match_transformers(tmp_path, pad_token):
  _write_folder(tmp_path, pad_token)
  reference = CLIPTokenizer.from_pretrained(str(tmp_path))
  want = reference(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                   return_tensors="np").input_ids
  tokenizer = load_tokenizer(str(tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # none of these prompts is too long
    got = tokenizer(PROMPTS)
  assert got.shape == (len(PROMPTS), MAX_LENGTH) and got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  vocab = json.loads((tmp_path / "vocab.json").read_text())
  assert got[0, 3] == vocab["of</w>"] and got[0, -1] == vocab[pad_token]  # merges applied, padded


def test_long_prompt_is_truncated_with_a_warning(tmp_path):
  _write_folder(tmp_path, "<|endoftext|>")
  long_prompt = "a photo of the cat " * 3  # 15 tokens > MAX_LENGTH - 2
  reference = CLIPTokenizer.from_pretrained(str(tmp_path))
  want = reference([long_prompt, "a cat"], padding="max_length", max_length=MAX_LENGTH,
                   truncation=True, return_tensors="np").input_ids
  with pytest.warns(UserWarning, match=r"prompt 0 .* truncated; dropped: 'a photo of the cat'"):
    got = load_tokenizer(str(tmp_path))([long_prompt, "a cat"])
  np.testing.assert_array_equal(got, want)


def test_bad_folders_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    load_tokenizer(str(tmp_path))
  _write_folder(tmp_path, "<|pad|>")
  with pytest.raises(ValueError, match="pad_token"):
    load_tokenizer(str(tmp_path))
  _write_folder(tmp_path, "!")
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="model_max_length"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_LENGTH}))
  with pytest.raises(TypeError, match="sequence of strings"):
    load_tokenizer(str(tmp_path))("a cat")
