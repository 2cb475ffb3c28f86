"""The DDPM CIFAR-10 recipe (Ho et al. 2020): U-Net 35.7M, linear schedule, T=1000.

  python -m jaxdiff.train --config=configs/cifar_unet.py --workdir=runs/cifar_unet

Adam at lr 2e-4 with 5,000 warmup steps, gradient clipping at 1, batch 128, dropout 0.1, random
flips, EMA 0.9999, 800k steps; the paper reports FID 3.17 (50k samples, 1000 ancestral steps).
Needs the prepared TFDS cifar10 dataset (see README).
"""

from configs import base
from configs import datasets


def get_config(arg: str | None = None):
  config = base.get_config()  # linear schedule, T=1000, clip 1, batch 128, EMA 0.9999.
  datasets.cifar10(config)
  config.model.name = "unet-ddpm-cifar10"
  config.model.overrides.dropout = 0.1
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.train.num_steps = 800_000
  config.sample.method = "ddpm"
  config.sample.num_steps = 1000
  base.apply_variants(config, arg)
  return config
