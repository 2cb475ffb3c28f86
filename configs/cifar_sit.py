"""SiT-S/2 on CIFAR-10: the DiT-S/2 backbone trained with flow matching (Ma et al. 2024).

  python -m jaxdiff.train --config=configs/cifar_sit.py --workdir=runs/cifar_sit
  python -m jaxdiff.sample --workdir=runs/cifar_sit --method=heun --num_steps=50 \
      --guidance_scale=1.5 --num_samples=50000 --batch_size=500
  python -m jaxdiff.sample --workdir=runs/cifar_sit --method=euler_maruyama --num_steps=250

SiT's recipe (sec. 4): linear interpolant x_t = (1 - t) x_0 + t ε, velocity prediction, t ~ U(0, 1),
AdamW at a constant lr 1e-4 without warmup, weight decay or gradient clipping, batch 256, EMA
0.9999, class-conditional with label dropout 0.1, sampled with an ODE (Heun) or the SDE
(Euler-Maruyama, diffusion g² = t). Variant `sde` makes the training previews use the SDE
sampler with 250 steps, as SiT's best FIDs. Differences from SiT's code: t runs from data (0) to
noise (1) as in SD3 and diffusers (SiT's runs the other way; the path is the same) and the
network sees t · 1000, the DDPM timestep range of the DiT embedding, rather than t.

Expected: a lower FID than configs/cifar_dit.py at the same step count, as on ImageNet 256
(SiT-S/2 57.6 vs DiT-S/2 68.4 FID-50K at 400k steps, the papers' Table 1s); not yet measured
here. Needs the prepared TFDS cifar10 dataset (see README).
"""

from configs import base
from configs import datasets


def get_config(arg: str | None = None):
  config = base.get_config()  # DiT-S/2, AdamW lr 1e-4, EMA 0.9999, 400k steps.
  datasets.cifar10(config)
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.diffusion.objective = "flow"  # uniform t, no shift: base's flow_* defaults.
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  config.train.batch_size = 256
  config.sample.method = "heun"
  config.sample.guidance_scale = 1.5
  base.apply_variants(config, arg, extra={"sde": _sde})
  return config


def _sde(config, value: str) -> None:
  """SiT's SDE sampler: Euler-Maruyama, 250 steps, diffusion g²(t) = t."""
  del value
  config.sample.method = "euler_maruyama"
  config.sample.num_steps = 250
