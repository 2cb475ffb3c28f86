"""A latent DiT run on the latents of a tiny random diffusers AutoencoderKL folder, in-process.

Shared by test_loop.py (decoded previews) and test_sample.py (the sample CLI decodes with the
folder, checked against diffusers' own decoder).
"""

import numpy as np


def make_latent_run(root, *, sample_every: int = 0):
  """Images -> a diffusers AutoencoderKL folder (every weight perturbed) -> cached latents ->
  two steps of a class-conditional dit-tiny trained by `loop.train` on them.

  Args:
    root: a pathlib folder for images/, vae/, latents/ and run/.
    sample_every: preview interval of the run (0 = none).

  Returns:
    (workdir, vae folder, final train state).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from jaxdiff import convert, data  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import encode  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import loop  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    (root / "images" / label).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
          root / "images" / label / f"{i}.png")
  torch.manual_seed(0)
  vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                      layers_per_block=1, latent_channels=4, norm_num_groups=4,
                      scaling_factor=0.5, shift_factor=0.1)
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  vae.save_pretrained(root / "vae")
  module, params = convert.load_diffusers(str(root / "vae"))
  cfg = data.DataConfig(source="folder", folder=str(root / "images"), image_size=16,
                        num_threads=0)
  encode.encode_dataset(cfg, module, params, str(root / "latents"), batch_size=8)
  config = base.get_config("tiny")
  config.data.source = "latents"
  config.data.latents_dir = str(root / "latents")
  config.autoencoder.path = str(root / "vae")
  config.model.class_conditional = True
  config.train.num_steps = 2
  config.train.sample_every = sample_every
  config.sample.num_steps = 2
  config.sample.clip_denoised = False
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  state = loop.train(config, str(root / "run"), devices=jax.devices()[:1])
  return str(root / "run"), str(root / "vae"), state
