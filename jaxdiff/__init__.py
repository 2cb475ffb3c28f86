"""jaxdiff: image diffusion models in JAX/Flax (DDPM, DDIM, DPM-Solver++; U-Net and DiT)."""

__version__ = "0.1.0"
