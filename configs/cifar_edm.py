"""EDM (Karras et al. 2022) on CIFAR-10, unconditional, with the paper's training and sampler.

  python -m jaxdiff.train --config=configs/cifar_edm.py --workdir=runs/cifar_edm
  python -m jaxdiff.sample --workdir=runs/cifar_edm --num_steps=18 --num_samples=50000 \
      --batch_size=500

The paper's CIFAR-10 settings (Table 1 and Appendix F.1): preconditioning with σ_data = 0.5,
ln σ ~ N(-1.2, 1.2²) in training with the loss weight (σ² + σ_d²) / (σ σ_d)², Adam at lr 1e-3
with a 10 Mimg warmup and no clipping, batch 512, 200 Mimg (390,625 steps), dropout 0.13, EMA
half-life 0.5 Mimg (0.9993 per step at batch 512); sampling with 18-step Heun (35 network
evaluations), σ from 80 to 0.002 with ρ = 7, no churn.

What differs from the paper: the backbone is Ho et al.'s 35.7M DDPM U-Net (positional timestep
embedding of c_noise = ¼ ln σ), not the 56M DDPM++ (4 blocks per level, channel_mult 2-2-2,
resampling filters, skip scaling); there is no non-leaky augmentation pipeline (the paper's p =
0.12), only random flips; the EMA is a fixed decay rather than a ramped half-life. The paper
reports FID 1.97 (unconditional, VP) with DDPM++; expect a worse FID here (not yet measured).
Needs the prepared TFDS cifar10 dataset (see README).
"""

from configs import base
from configs import datasets

BATCH = 512


def get_config(arg: str | None = None):
  config = base.get_config()
  datasets.cifar10(config)
  config.model.name = "unet-ddpm-cifar10"
  config.model.overrides.dropout = 0.13
  config.diffusion.objective = "edm"  # P_mean -1.2, P_std 1.2, sigma_data 0.5: base defaults.
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10_000_000 // BATCH
  config.optimizer.grad_clip_norm = 0.0
  config.train.num_steps = 200_000_000 // BATCH
  config.train.batch_size = BATCH
  config.train.ema_decays = (0.9993,)  # 0.5 ** (BATCH / 500_000): half-life 0.5 Mimg
  config.sample.method = "heun"  # sigma 80 -> 0.002, rho 7, no churn: base defaults.
  config.sample.num_steps = 18
  base.apply_variants(config, arg)
  return config
