"""The DDPM CIFAR-10 recipe (Ho et al. 2020): U-Net 35.7M, linear schedule, T=1000.

  python -m jaxdiff.train --config=configs/cifar_unet.py --workdir=runs/cifar_unet

Adam at lr 2e-4 with 5,000 warmup steps, gradient clipping at 1, batch 128, dropout 0.1, random
flips, EMA 0.9999, 800k steps; the paper reports FID 3.17 (50k samples, 1000 ancestral steps).
Needs the prepared TFDS cifar10 dataset (see README).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.name = "unet-ddpm-cifar10"
  config.model.overrides.dropout = 0.1
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.optimizer.grad_clip_norm = 1.0
  config.train.num_steps = 800_000
  config.train.batch_size = 128
  config.train.ema_decays = (0.9999,)
  config.sample.method = "ddpm"
  config.sample.num_steps = 1000
  base.apply_variants(config, arg)
  return config
