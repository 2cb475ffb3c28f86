"""U-Net on Fashion-MNIST (32x32, padded), matched with fashion_mnist_dit.py for a comparison.

  python -m jaxdiff.train --config=configs/fashion_mnist_unet.py --workdir=runs/fmnist_unet

Both configs share everything (data, schedule, optimizer, steps, batch, EMA, sampler) except the
backbone: compare their metrics.jsonl losses and sample grids at equal steps. Needs the prepared
TFDS fashion_mnist dataset (see README).
"""

from configs import base
from configs import datasets


def fashion_mnist_config():
  """Everything but the backbone (shared by fashion_mnist_unet.py and fashion_mnist_dit.py)."""
  config = base.get_config()
  datasets.fashion_mnist(config)
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.optimizer.learning_rate = 2e-4
  config.train.num_steps = 100_000
  config.train.sample_every = 5000
  config.sample.guidance_scale = 2.0
  return config


def get_config(arg: str | None = None):
  config = fashion_mnist_config()
  config.model.name = "unet-small"
  base.apply_variants(config, arg)
  return config
