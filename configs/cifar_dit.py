"""Class-conditional DiT-S/2 on CIFAR-10, with label dropout 0.1 for classifier-free guidance.

  python -m jaxdiff.train --config=configs/cifar_dit.py --workdir=runs/cifar_dit
  python -m jaxdiff.train --config=configs/cifar_dit.py:model=dit-b/2 --workdir=runs/cifar_dit_b

Needs the prepared TFDS cifar10 dataset (see README). DiT's recipe: AdamW at lr 1e-4, no weight
decay, EMA 0.9999, linear schedule with T=1000; 400k steps at batch 128.
"""

from configs import base
from configs import datasets


def get_config(arg: str | None = None):
  config = base.get_config()  # DiT-S/2, lr 1e-4, warmup 1000, 400k steps at batch 128.
  datasets.cifar10(config)
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.sample.guidance_scale = 1.5
  base.apply_variants(config, arg)
  return config
