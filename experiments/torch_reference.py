"""The PyTorch reference for the speed comparisons: diffusers models, an AdamW step, DDIM sampling.

Both sides run the same architectures at the same batch size, randomly initialised (nothing is
downloaded): diffusers' `UNet2DModel` with the configuration of google/ddpm-cifar10-32 (DDPM's
35.7M-parameter CIFAR-10 U-Net) and `DiTTransformer2DModel` with the DiT-S/2 and DiT-B/2 sizes of
the DiT paper at 32x32x3. The train step mirrors jaxdiff's: epsilon-prediction MSE on
`q_sample(x0, t, noise)` with the linear DDPM schedule, global-norm clipping at 1, AdamW and one
EMA update. PyTorch runs eagerly (no `torch.compile`), the way the reference code is usually run.
"""

import contextlib
from typing import Callable

import torch

# google/ddpm-cifar10-32's config.json, written out (Ho et al. 2020 CIFAR-10 model).
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)

# DiT paper, table 1: (layers, heads); every size has 64 channels per head.
DIT_LAYERS_HEADS = {"dit-s/2": (12, 6), "dit-b/2": (12, 12), "dit-l/2": (24, 16),
                    "dit-xl/2": (28, 16)}


def build_reference(name: str, num_classes: int = 10) -> torch.nn.Module:
  """Builds the diffusers model matching jaxdiff's `build_model(name)` at 32x32x3."""
  import diffusers  # pylint: disable=import-outside-toplevel
  if name == "unet-ddpm-cifar10":
    return diffusers.UNet2DModel(**DDPM_CIFAR10_UNET)
  if name in DIT_LAYERS_HEADS:
    layers, heads = DIT_LAYERS_HEADS[name]
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=64, in_channels=3, out_channels=3,
        num_layers=layers, sample_size=32, patch_size=2, num_embeds_ada_norm=num_classes)
  raise ValueError(f"no PyTorch reference for {name!r}")


def is_class_conditional(name: str) -> bool:
  """diffusers' DiT always takes labels; the DDPM U-Net takes none."""
  return name.startswith("dit")


def _linear_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
  betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
  return torch.cumprod(1 - betas, 0).float()


def _autocast(dtype: str):
  if dtype == "bfloat16":
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
  return contextlib.nullcontext()


def _predict(model, name, x, t, y):
  if is_class_conditional(name):
    return model(x, timestep=t, class_labels=y).sample
  return model(x, t).sample


def make_train_step(name: str, batch_size: int, dtype: str = "float32",
                    image_size: int = 32, seed: int = 0) -> tuple[Callable[[], None], int]:
  """Returns (a closure running one AdamW train step on a fixed batch, parameter count).

  Args:
    name: jaxdiff model name (see `build_reference`).
    batch_size: images per step.
    dtype: "float32", or "bfloat16" for autocast (parameters and optimizer stay float32, as in
      jaxdiff's mixed precision).
  """
  torch.manual_seed(seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = build_reference(name).to(device).train()
  ema = [p.detach().clone() for p in model.parameters()]
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  alphas_cumprod = _linear_alphas_cumprod().to(device)
  x0 = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
  y = torch.randint(0, 10, (batch_size,), device=device)

  def step():
    t = torch.randint(0, 1000, (batch_size,), device=device)
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with _autocast(dtype):
      prediction = _predict(model, name, x_t, t, y)
    loss = torch.mean((prediction.float() - noise) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)  # pylint: disable=protected-access

  return step, sum(p.numel() for p in model.parameters())


def make_scheduler(method: str, num_steps: int):
  """diffusers' DDIM (eta 0) or DPM-Solver++ (2M) on DDPM's linear schedule, `leading` spacing."""
  import diffusers  # pylint: disable=import-outside-toplevel
  common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                beta_schedule="linear", timestep_spacing="leading")
  if method == "ddim":
    scheduler = diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
  elif method == "dpmpp_2m":
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2)
  else:
    raise ValueError(f"no PyTorch reference sampler for {method!r}")
  scheduler.set_timesteps(num_steps)
  return scheduler


def make_sampler(name: str, method: str, num_steps: int, batch_size: int,
                 dtype: str = "float32", image_size: int = 32, seed: int = 0,
                 num_forwards: int | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
  """Returns (a closure sampling one batch, a closure running bare forward passes).

  The second runs `num_forwards` forward passes (default `num_steps`) on the same batch.
  """
  torch.manual_seed(seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = build_reference(name).to(device).eval()
  x_T = torch.randn(batch_size, 3, image_size, image_size, device=device)
  y = torch.randint(0, 10, (batch_size,), device=device)

  @torch.inference_mode()
  def sample():
    scheduler = make_scheduler(method, num_steps)
    x = x_T
    for t in scheduler.timesteps:
      with _autocast(dtype):
        eps = _predict(model, name, x, t.expand(batch_size).to(device), y).float()
      x = scheduler.step(eps, t, x).prev_sample

  @torch.inference_mode()
  def forwards():
    t = torch.full((batch_size,), 500, device=device)
    for _ in range(num_forwards or num_steps):
      with _autocast(dtype):
        _predict(model, name, x_T, t, y)

  return sample, forwards
