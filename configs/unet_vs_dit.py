"""U-Net vs DiT: two backbones of matched size, everything else equal (experiments/unet_vs_dit).

  python -m jaxdiff.train --config=configs/unet_vs_dit.py:backbone=unet,steps=400 --workdir=runs/a
  python -m jaxdiff.train --config=configs/unet_vs_dit.py:backbone=dit,steps=400 --workdir=runs/b

Variants (besides base's tiny, model=, steps=, batch=):
  backbone=unet|dit                 which of the two (default unet)
  data=mnist_offline|fashion_mnist  the offline digits (default) or a prepared TFDS Fashion-MNIST
  scale=cpu|small|large             matched sizes: ~0.7M, ~1.6M (default) or ~6M parameters each
Both are class-conditional at 32x32x1 with label dropout 0.1; AdamW at 1e-3 with a 5% warmup and a
cosine decay, EMA 0.995 and a DDIM-50 grid with guidance 2 at the end. Schedule-dependent fields
(warmup, logging, grid and checkpoint) follow the `steps=` variant.
"""

from configs import base
from configs import datasets

# scale -> {backbone: (model name, size overrides)}, matched in parameter count within a few %.
SCALES = {
    "cpu": {"unet": ("unet-tiny", {}),
            "dit": ("dit-s/2", dict(hidden_size=128, depth=2, num_heads=4))},
    "small": {"unet": ("unet-small", dict(channels=32)),
              "dit": ("dit-s/2", dict(hidden_size=144, depth=4, num_heads=4))},
    "large": {"unet": ("unet-small", dict(channels=64)),
              "dit": ("dit-s/2", dict(hidden_size=256, depth=8, num_heads=4))},
}
_DATASETS = {"mnist_offline": lambda config: None, "fashion_mnist": datasets.fashion_mnist}


def get_config(arg: str | None = None):
  choice = {"backbone": "unet", "data": "mnist_offline", "scale": "small"}

  def chooser(name, allowed):
    def choose(config, value):
      del config
      if value not in allowed:
        raise ValueError(f"config variant {name}={value!r}: use one of {sorted(allowed)}")
      choice[name] = value
    return choose

  config = base.get_config()
  config.train.num_steps = 400
  config.train.batch_size = 32
  extra = {"backbone": chooser("backbone", ("unet", "dit")), "data": chooser("data", _DATASETS),
           "scale": chooser("scale", SCALES)}
  base.apply_variants(config, arg, extra)
  _DATASETS[choice["data"]](config)
  if not config.model.name.endswith("-tiny"):  # the tiny variant keeps its tiny model
    name, sizes = SCALES[choice["scale"]][choice["backbone"]]
    config.model.name = name
    for field, value in sizes.items():
      config.model.overrides[field] = value
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  steps = config.train.num_steps
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = max(steps // 20, 1)
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_fraction = 0.05
  config.train.ema_decays = (0.995,)
  config.train.log_every = max(steps // 40, 1)
  config.train.sample_every = steps
  config.train.progress_bar = False
  config.checkpoint.every_steps = steps
  config.sample.num_images = 16
  config.sample.guidance_scale = 2.0
  return config
