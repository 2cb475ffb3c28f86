"""Class-conditional DiT-S/2 on CIFAR-10, with label dropout 0.1 for classifier-free guidance.

  python -m jaxdiff.train --config=configs/cifar_dit.py --workdir=runs/cifar_dit
  python -m jaxdiff.train --config=configs/cifar_dit.py:model=dit-b/2 --workdir=runs/cifar_dit_b

Needs the prepared TFDS cifar10 dataset (see README). DiT's recipe: AdamW at lr 1e-4, no weight
decay, EMA 0.9999, linear schedule with T=1000; 400k steps at batch 128.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.name = "dit-s/2"
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 1000
  config.train.num_steps = 400_000
  config.train.batch_size = 128
  config.sample.guidance_scale = 1.5
  base.apply_variants(config, arg)
  return config
