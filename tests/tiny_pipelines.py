"""Tiny random diffusers pipelines written with save_pretrained, for the pipeline tests.

Every weight is perturbed away from its initialisation (zero inits cannot hide mistakes), except
that the DiT's per-block timestep/label embedders are tied afterwards, as in every published DiT
checkpoint (jaxdiff's DiT shares one embedder). The tokenizer has CLIP's 256 byte-level symbols,
a few merges and a context of 12 tokens.
"""

import contextlib
import json
import os

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,
                       DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LENGTH = 12
MERGES = ["p h", "o t", "ph ot", "phot o</w>", "o f</w>", "c a", "ca t</w>", "t h", "th e</w>"]


@contextlib.contextmanager
def one_torch_thread():
  """Runs torch on one thread: once XLA's CPU thread pool has run, torch's own threads contend
  with it and a tiny pipeline call takes seconds instead of milliseconds."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _vae(seed: int) -> AutoencoderKL:
  """16x16x3 images <-> 8x8x4 latents, scaling factor 0.5."""
  torch.manual_seed(seed)
  return _perturbed(AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
      sample_size=16, scaling_factor=0.5), seed)


def save_dit_pipeline(path: str) -> DiTPipeline:
  """DiT (learned sigma: 8 output channels, 1000 classes) + VAE + DDIM (diffusers defaults
  but clip_sample=False)."""
  torch.manual_seed(0)
  dit = _perturbed(DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
      sample_size=8, patch_size=2), 1)
  for block in dit.transformer_blocks[1:]:
    block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
  pipe = DiTPipeline(transformer=dit, vae=_vae(2), scheduler=DDIMScheduler(clip_sample=False))
  pipe.save_pretrained(path)
  return pipe


def _tokenizer(path: str) -> CLIPTokenizer:
  os.makedirs(path, exist_ok=True)
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  words = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in MERGES]
  words += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({w: i for i, w in enumerate(words)}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                       model_max_length=MAX_LENGTH)


def save_sd_pipeline(path: str) -> StableDiffusionPipeline:
  """SD 1.x layout: CLIP (2 layers, width 16) + cross-attention U-Net (16, 32) + VAE +
  DPM-Solver++ with SD's scaled_linear betas and steps_offset=1."""
  tokenizer = _tokenizer(path + "_tokenizer_source")
  vocab = len(tokenizer)
  torch.manual_seed(0)
  text_encoder = _perturbed(CLIPTextModel(CLIPTextConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=2,
      num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=vocab - 1)), 3)
  torch.manual_seed(0)
  unet = _perturbed(UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 4)
  scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                          beta_end=0.012, steps_offset=1)
  pipe = StableDiffusionPipeline(
      vae=_vae(5), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(path)
  pipe.set_progress_bar_config(disable=True)
  return pipe
