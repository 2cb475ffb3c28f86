"""A KL autoencoder trained on the 5,000 offline MNIST digits: step 1 of the offline latent run.

  python -m jaxdiff.train --config=configs/mnist_autoencoder.py --workdir=runs/mnist_autoencoder

`kl-f4-small` (about 0.95M parameters) maps 32x32x1 digits to 8x8x4 latents. The loss is base's
`autoencoder` section: LDM's reconstruction (L1) + 1e-6 * KL(q(z|x) || N(0, I)), per image
element, without LDM's perceptual (LPIPS) and adversarial terms. Previews (runs/mnist_autoencoder/samples/step_XXXXXX.png) show
each of the first 36 digits beside its reconstruction from the EMA params. On a CPU this is
meant to take a few minutes; the reconstruction L1 (train/reconstruction) should fall well
below 0.1. Then encode the digits and train the latent DiT: see configs/mnist_latent_dit.py.

Variant `tiny`: kl-tiny on 16x16 digits, 8 steps (tests).
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config()
  config.task = "autoencoder"
  config.model.name = "kl-f4-small"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_fraction = 0.1
  config.train.num_steps = 1000
  config.train.batch_size = 32
  config.train.ema_decays = (0.99,)  # a short run: the average must follow fast-moving weights
  config.train.log_every = 50
  config.train.sample_every = 250
  config.checkpoint.every_steps = 250
  config.sample.num_images = 36
  base.apply_variants(config, arg)
  return config
