"""Base configuration: every field, with what it means. Experiment configs override a few.

Run (any experiment config works the same way; overrides use --config.section.field=value):
  python -m jaxdiff.train --config=configs/cifar_dit.py --workdir=runs/cifar_dit
  python -m jaxdiff.train --config=configs/cifar_dit.py:tiny --workdir=/tmp/debug

The argument after ':' is a comma-separated list of variants parsed by `apply_variants`:
  tiny               a tiny model, batch 8, a few steps (tests, debugging on a laptop)
  model=NAME         another size from the table, e.g. model=dit-b/2 (clears model.overrides)
  steps=N            train for N steps
  batch=N            global batch of N
The returned ConfigDict is locked: an override of a field that does not exist is an error.
"""

from typing import Callable, Mapping

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the full default configuration, with the variants in `arg` applied."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds init, data order, per-step keys and the sample-grid noise.
  config.task = "diffusion"  # diffusion (a denoiser; model.name from MODEL_SIZES) | autoencoder (a KL autoencoder; model.name from AUTOENCODER_SIZES).

  config.model = ml_collections.ConfigDict()
  config.model.name = "dit-s/2"  # Entry of jaxdiff.models.MODEL_SIZES (dit-*/unet-*); task=autoencoder: of AUTOENCODER_SIZES (kl-*); "pipeline": the U-Net of text.pipeline.
  config.model.class_conditional = False  # Condition on the dataset's labels (num_classes).
  config.model.class_dropout_prob = 0.0  # Label dropout for classifier-free guidance (> 0 adds the null label).
  config.model.learn_sigma = False  # Also predict the variance (2C outputs; adds the VLB term).
  config.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
  # Optional size-table overrides; None keeps the table's value. Not every model has every field
  # (DiT: hidden_size, depth, num_heads, patch_size, remat, scan_blocks; U-Net: channels, dropout,
  # channel_mult, num_res_blocks, attention_levels);
  # setting one the model lacks is an error.
  config.model.overrides = ml_collections.ConfigDict()
  config.model.overrides.hidden_size = ml_collections.FieldReference(None, field_type=int)  # DiT width.
  config.model.overrides.depth = ml_collections.FieldReference(None, field_type=int)  # DiT blocks.
  config.model.overrides.num_heads = ml_collections.FieldReference(None, field_type=int)  # DiT heads.
  config.model.overrides.patch_size = ml_collections.FieldReference(None, field_type=int)  # DiT patch.
  config.model.overrides.remat = ml_collections.FieldReference(None, field_type=bool)  # DiT: recompute blocks in backward.
  config.model.overrides.scan_blocks = ml_collections.FieldReference(None, field_type=bool)  # DiT: nn.scan over blocks (faster compile).
  config.model.overrides.channels = ml_collections.FieldReference(None, field_type=int)  # U-Net width of level 0.
  config.model.overrides.dropout = ml_collections.FieldReference(None, field_type=float)  # U-Net dropout.
  config.model.overrides.channel_mult = ml_collections.FieldReference(None, field_type=tuple)  # U-Net width multiplier per level, e.g. (1, 2, 2).
  config.model.overrides.num_res_blocks = ml_collections.FieldReference(None, field_type=int)  # U-Net ResBlocks per level.
  config.model.overrides.attention_levels = ml_collections.FieldReference(None, field_type=tuple)  # U-Net levels with self-attention (0 = full size).

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.objective = "ddpm"  # ddpm (noise schedule, fields below to vlb_weight) | flow (rectified flow, flow_*) | edm (Karras et al., edm_*).
  config.diffusion.schedule = "linear"  # Beta schedule: linear | cosine | scaled_linear.
  config.diffusion.num_timesteps = 1000  # T; timesteps are 0..T-1.
  config.diffusion.prediction = "eps"  # Network target: eps | x0 | v.
  config.diffusion.loss_type = "l2"  # l2 | l1 | huber.
  config.diffusion.huber_delta = 0.1  # Huber transition point (loss_type=huber only).
  config.diffusion.weighting = "none"  # Per-timestep loss weight: none | min_snr.
  config.diffusion.min_snr_gamma = 5.0  # gamma of Min-SNR weighting (weighting=min_snr only).
  config.diffusion.vlb_weight = 1e-3  # Weight of the VLB term for the learned variance.
  config.diffusion.flow_timestep_sampling = "uniform"  # Flow t ~ uniform | logit_normal | mode (SD3 sec. 3.1).
  config.diffusion.flow_logit_mean = 0.0  # Flow logit_normal: mean of logit(t).
  config.diffusion.flow_logit_std = 1.0  # Flow logit_normal: std of logit(t).
  config.diffusion.flow_mode_scale = 1.29  # Flow mode: scale s of the mode density.
  config.diffusion.flow_shift = 1.0  # Flow timestep shift s t / (1 + (s - 1) t), training and sampling; 1 = none.
  config.diffusion.edm_p_mean = -1.2  # EDM: mean of ln(sigma) in training.
  config.diffusion.edm_p_std = 1.2  # EDM: std of ln(sigma) in training.
  config.diffusion.edm_sigma_data = 0.5  # EDM: data std of the preconditioning and loss weight.

  config.data = ml_collections.ConfigDict()  # Mapped field by field onto jaxdiff.data.DataConfig.
  config.data.source = "mnist_offline"  # tfds | folder | mnist_offline (5,000 digits, no download) | latents.
  config.data.name = ""  # TFDS dataset name (source=tfds), e.g. cifar10, fashion_mnist.
  config.data.split = "train"  # Split to train on, e.g. train or train[:90%].
  config.data.data_dir = ""  # TFDS data_dir; "" = TFDS default ($TFDS_DATA_DIR, ~/tensorflow_datasets).
  config.data.folder = ""  # Root of an image folder, classes from subfolders (source=folder).
  config.data.image_size = 32  # Side of the square training images.
  config.data.channels = 0  # 1 or 3; 0 keeps the dataset's own channel count.
  config.data.fit = "pad"  # Non-square/other sizes: pad (centre, zeros) | resize (and centre-crop).
  config.data.random_flip = False  # Random horizontal flips (off for digits).
  config.data.latents_dir = ""  # Cached latents from python -m jaxdiff.data.encode (source=latents).
  config.data.latent_sampling = "sample"  # Latents: sample z ~ q(z|x) at every step, or use the mean.
  config.data.image_key = "image"  # TFDS feature with the image.
  config.data.label_key = "label"  # TFDS feature with the class label.
  config.data.download = False  # Prepare a missing TFDS dataset (needs TensorFlow and internet).
  config.data.num_workers = 0  # grain worker processes (0 = read in the main process).
  config.data.num_threads = 4  # Reader threads per process.
  config.data.prefetch = 4  # Batches read ahead per process.
  config.data.skip_bad_records = False  # Skip and count unreadable records (else stop).

  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.path = ""  # data.source=latents: the autoencoder of the latents (decodes previews, samples): a jaxdiff autoencoder run's workdir (EMA params) or a diffusers AutoencoderKL folder.
  config.autoencoder.loss_type = "l1"  # task=autoencoder: reconstruction loss l1 | l2 (LDM: l1).
  config.autoencoder.kl_weight = 1e-6  # task=autoencoder: weight of KL(q(z|x) || N(0, I)), per image element as LDM's.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4  # Peak learning rate (AdamW).
  config.optimizer.warmup_steps = 1000  # Linear warmup from 0 to the peak.
  config.optimizer.decay = "constant"  # After warmup: constant | cosine (to end_lr_fraction * peak).
  config.optimizer.end_lr_fraction = 0.0  # Final lr as a fraction of the peak (decay=cosine).
  config.optimizer.b1 = 0.9  # Adam beta1.
  config.optimizer.b2 = 0.999  # Adam beta2.
  config.optimizer.eps = 1e-8  # Adam epsilon.
  config.optimizer.weight_decay = 0.0  # Decoupled weight decay (AdamW).
  config.optimizer.grad_clip_norm = 1.0  # Clip gradients to this global norm (0 = off).

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 400_000  # Total optimizer steps.
  config.train.batch_size = 128  # Global batch (all devices and hosts together).
  config.train.steps_per_dispatch = 1  # Steps per jitted call (lax.scan; fewer host round trips on TPU/GPU, slow on CPU).
  config.train.ema_decays = (0.9999,)  # EMA decay rates; each keeps a float32 copy of the params.
  config.train.log_every = 100  # Steps between metric lines (metrics.jsonl, TensorBoard).
  config.train.sample_every = 10_000  # Steps between sample grids (samples/step_XXXXXX.png); 0 = off.
  config.train.progress_bar = True  # tqdm bar with ETA on process 0.
  config.train.skip_nonfinite_updates = False  # Drop and count NaN/Inf updates (else stop).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000  # Steps between checkpoints (the last step is always saved).
  config.checkpoint.max_to_keep = 3  # Keep the newest N checkpoints.
  config.checkpoint.async_save = True  # Write checkpoints in the background.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1  # Devices per fsdp group (shards params/EMA/moments); the rest are data.
  config.mesh.fsdp_min_size = 2**14  # Params with fewer elements stay replicated.
  # CPU-only `jaxdiff.train`: split the host's cores into this many JAX devices (data parallel).
  # Faster for small models (configs/mnist_offline.py), slower for DiT-S/2 (experiments/README.md).
  config.mesh.cpu_devices = 0  # 0 = JAX's one CPU device.

  config.sample = ml_collections.ConfigDict()
  config.sample.method = "ddim"  # Sampler for grids during training: ddpm | ddim | dpmpp_2m | unipc | euler | euler_ancestral | heun; flow: euler | heun | euler_maruyama; edm: heun.
  config.sample.num_steps = 50  # Sampler steps.
  config.sample.eta = 0.0  # DDIM eta (0 = deterministic).
  config.sample.spacing = ml_collections.FieldReference(None, field_type=str)  # Grid: leading | linspace | trailing; None = the method's diffusers default.
  config.sample.num_images = 64  # Images per grid (labels cycle 0..num_classes-1 if conditional).
  config.sample.guidance_scale = 1.0  # Classifier-free guidance uncond + s * (cond - uncond); 1 = off.
  config.sample.guidance_interval = ()  # (t_low, t_high): guide only at those model timesteps (flow: t*T; edm: sigma); () = everywhere.
  config.sample.guidance_rescale = 0.0  # CFG rescale phi (Lin et al. 2024); 0 = off.
  config.sample.karras_sigmas = False  # Karras sigmas (dpmpp_2m, unipc, euler, heun).
  config.sample.solver_order = 2  # UniPC order (1-3).
  config.sample.diffusion_scale = 1.0  # Flow euler_maruyama: c of the diffusion g^2(t) = c t (SiT).
  config.sample.sigma_min = 0.002  # EDM: smallest noise level of the grid.
  config.sample.sigma_max = 80.0  # EDM: largest noise level of the grid.
  config.sample.rho = 7.0  # EDM: rho of the noise-level spacing (eq. 5).
  config.sample.s_churn = 0.0  # EDM: stochastic churn S_churn; 0 = deterministic Heun.
  config.sample.s_min = 0.0  # EDM: churn only at sigma >= S_min.
  config.sample.s_max = float("inf")  # EDM: churn only at sigma <= S_max.
  config.sample.s_noise = 1.0  # EDM: churn noise scale S_noise.
  config.sample.ema_decay = 0.0  # Which EMA params to sample from; 0 = the first of train.ema_decays.
  config.sample.clip_denoised = True  # Clip predicted x0 to [-1, 1] in each step (ddpm objective).

  config.text = ml_collections.ConfigDict()  # Text-to-image fine-tuning (configs/mnist_captions.py).
  config.text.pipeline = ""  # StableDiffusionPipeline folder whose U-Net is fine-tuned (text encoder, VAE frozen); "" = off.
  config.text.caption_dropout_prob = 0.1  # Caption -> the empty prompt's embedding with this probability (for guidance).
  config.text.init_from_pipeline = True  # Start from the pipeline's U-Net weights (False: fresh init of its layout).

  config.eval = ml_collections.ConfigDict()
  config.eval.fid_every = 0  # Steps between FID evaluations during training; 0 = off.
  config.eval.num_samples = 10_000  # Samples per FID evaluation.
  config.eval.inception_weights = ""  # Path to the Inception weights for FID.
  config.eval.reference_stats = ""  # Path to the reference statistics (.npz) of the dataset.

  apply_variants(config, arg)
  config.lock()
  return config


def apply_variants(config: ml_collections.ConfigDict, arg: str | None,
                   extra: Mapping[str, Callable[[ml_collections.ConfigDict, str], None]]
                   | None = None) -> None:
  """Applies the comma-separated variants of the config argument (see the module docstring).

  Args:
    config: the config to change in place.
    arg: e.g. "tiny,steps=100".
    extra: an experiment config's own variants, {name: apply(config, value)}.
  """
  extra = extra or {}
  for variant in filter(None, (arg or "").split(",")):
    name, _, value = variant.partition("=")
    if name == "tiny":
      _make_tiny(config)
    elif name == "model" and value:
      config.model.name = value
      for field in config.model.overrides:  # Overrides were sized for the previous model.
        config.model.overrides[field] = None
    elif name == "steps" and value:
      config.train.num_steps = int(value)
    elif name == "batch" and value:
      config.train.batch_size = int(value)
    elif name in extra:
      extra[name](config, value)
    else:
      names = ", ".join(["tiny", "model=NAME", "steps=N", "batch=N", *extra])
      raise ValueError(f"unknown config variant {variant!r}; use {names}")


def _make_tiny(config: ml_collections.ConfigDict) -> None:
  """A model and run small enough for a CPU test: seconds per step, a handful of steps."""
  is_dit = config.model.name.startswith("dit")
  if config.task == "autoencoder":
    config.model.name = "kl-tiny"
  else:
    config.model.name = "dit-tiny" if is_dit else "unet-tiny"
  if is_dit:  # dit-tiny's own size, whatever the experiment's DiT was
    for field in ("hidden_size", "depth", "num_heads", "patch_size"):
      config.model.overrides[field] = None
  config.model.dtype = "float32"
  config.data.image_size = 16
  config.diffusion.num_timesteps = 100
  config.optimizer.warmup_steps = 2
  config.train.num_steps = 8
  config.train.batch_size = 8
  config.train.log_every = 2
  config.train.sample_every = 8
  config.train.ema_decays = (0.9, 0.99)
  config.train.progress_bar = False
  config.checkpoint.every_steps = 4
  config.checkpoint.max_to_keep = 2
  config.sample.num_steps = 4
  config.sample.num_images = 4
  config.eval.fid_every = 0
