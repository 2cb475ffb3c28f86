"""The DiT paper's ImageNet 256x256 recipe (Peebles & Xie 2023): DiT-XL/2 on 32x32x4 latents.

  # once: encode ImageNet with the Stable Diffusion VAE (scaling 0.18215), both flips stored
  python -m jaxdiff.data.encode --autoencoder=path/to/sd-vae-ft-ema --source=tfds \
      --name=imagenet2012 --image_size=256 --random_flip --output_dir=latents/imagenet256
  python -m jaxdiff.train --config=configs/imagenet256_dit.py --workdir=runs/dit_xl2
  python -m jaxdiff.train --config=configs/imagenet256_dit.py:model=dit-b/2 ...   # cheaper

Recipe (paper Sec. 4 and its train.py): class-conditional with label dropout 0.1, learned
variance (learn_sigma, hybrid loss), linear schedule with T=1000, AdamW at a constant 1e-4 with
no warmup, no weight decay and no gradient clipping, global batch 256, EMA 0.9999, 400k steps.
The paper reports FID-50K 9.62 without guidance and 2.27 with guidance 1.5 (250 DDPM steps) at
7M steps; at 400k steps DiT-XL/2 reaches FID 19.5 without guidance. Latents are sampled from the
posterior at every step (`data.latent_sampling = "sample"`), as DiT's own code does.
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config()
  config.model.name = "dit-xl/2"
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.model.learn_sigma = True
  config.data.source = "latents"
  config.data.latents_dir = "latents/imagenet256"  # written by the encode command above
  config.autoencoder.path = "path/to/sd-vae-ft-ema"  # decodes previews and samples; set yours
  config.data.random_flip = True
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.train.batch_size = 256
  config.sample.method = "ddpm"
  config.sample.num_steps = 250
  config.sample.guidance_scale = 1.5
  config.sample.clip_denoised = False
  base.apply_variants(config, arg)
  return config
