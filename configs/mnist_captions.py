"""Text-to-image fine-tuning, offline: a tiny random Stable Diffusion pipeline on captioned digits.

Setup (no download; torch, diffusers and transformers from jaxdiff's test extras), then cache the
frozen autoencoder's latents and the text encoder's caption embeddings once, then train:

  python -m experiments.tiny_sd --out=/tmp/jaxdiff_t2i
  python -m jaxdiff.data.encode --pipeline=/tmp/jaxdiff_t2i/pipeline --source=captions \
      --folder=/tmp/jaxdiff_t2i/digits --image_size=16 --fit=resize --channels=1 \
      --output_dir=/tmp/jaxdiff_t2i/cache
  python -m jaxdiff.train --config=configs/mnist_captions.py --workdir=runs/mnist_captions
  python -m jaxdiff.sample --workdir=runs/mnist_captions --prompt="a handwritten digit 3" \
      --guidance_scale=4 --num_steps=25 --num_samples=64

The paths are the defaults of `--config.text.pipeline` and `--config.data.latents_dir`. Each
digit is captioned "a handwritten digit N"; captions are dropped (replaced by the empty
prompt's embedding) 10% of the time (base's text.caption_dropout_prob), so guidance can pick the digit named in the prompt
(experiments/t2i_digits.py measures how often it does).
"""

from configs import base

SETUP = "/tmp/jaxdiff_t2i"


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.name = "pipeline"  # the U-Net of text.pipeline
  config.text.pipeline = f"{SETUP}/pipeline"
  config.data.source = "latents"
  config.data.latents_dir = f"{SETUP}/cache"
  config.data.latent_sampling = "mean"  # a random autoencoder's posterior noise is not informative
  # The pipeline's scheduler: Stable Diffusion's scaled_linear betas, eps prediction.
  config.diffusion.schedule = "scaled_linear"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_fraction = 0.05
  config.train.num_steps = 2000
  config.train.batch_size = 64
  config.train.ema_decays = (0.99,)
  config.train.sample_every = 0  # no grids during training: sample with --prompt afterwards
  config.checkpoint.every_steps = 500
  config.sample.clip_denoised = False  # latents are not confined to [-1, 1]
  base.apply_variants(config, arg)
  return config
