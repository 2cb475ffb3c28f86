"""A DiT with patch 2 on Fashion-MNIST, narrowed to unet-small's parameter count (fashion_mnist_unet.py).

  python -m jaxdiff.train --config=configs/fashion_mnist_dit.py --workdir=runs/fmnist_dit
"""

from configs import base
from configs import fashion_mnist_unet


def get_config(arg: str | None = None):
  config = fashion_mnist_unet.fashion_mnist_config()
  config.model.name = "dit-s/2"
  # Narrowed to 6.48M parameters, matching unet-small's 6.47M (with 10 classes + the null row).
  config.model.overrides.hidden_size = 240
  config.model.overrides.depth = 6
  config.model.overrides.num_heads = 4
  base.apply_variants(config, arg)
  return config
