"""Builds jaxdiff's real jitted train step for a benchmark, on a synthetic 32x32x3 batch.

The step is the one `python -m jaxdiff.train` runs (`jaxdiff.train.builder.make_step_fn`: the
sharded, donated `multi_step` over `train_step`, with AdamW, gradient clipping and one EMA),
built by `jaxdiff.train.builder.build_run` from `configs/base.py` with a few overrides. Only the dataset is replaced: a CIFAR-10-shaped
`DatasetInfo` (32x32x3, 10 classes) and a fixed random batch, so no data has to be on disk.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from jaxdiff.data import DatasetInfo
from jaxdiff.train import builder
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import step as step_lib

CIFAR10_INFO = DatasetInfo(image_size=32, channels=3, num_classes=10, num_examples=50_000)


def is_class_conditional(model_name: str) -> bool:
  """DiTs are benchmarked class-conditional (as in the DiT paper), the DDPM U-Net is not."""
  return model_name.startswith("dit")


@dataclasses.dataclass
class TrainBench:
  """A ready-to-run train step: call `step_fn(state, batches, key)`; `state` is donated."""
  run: Any
  state: Any
  step_fn: Any
  batches: dict
  key: jax.Array


def make_train_bench(model_name: str, dtype: str, batch_size: int, *, seed: int = 0,
                     info: DatasetInfo = CIFAR10_INFO, **model_overrides) -> TrainBench:
  """jaxdiff's train step for `model_name` at `dtype` on a fixed batch of `batch_size` images.

  Args:
    model_name: entry of jaxdiff.models.MODEL_SIZES.
    dtype: "float32" or "bfloat16" compute (params, EMA and moments stay float32).
    batch_size: global batch (divisible by the device count).
    info: the dataset shape the model is built for.
    **model_overrides: size-table fields of config.model.overrides (e.g. scan_blocks=True).
  """
  config_dict = base.get_config()
  config_dict.model.name = model_name
  config_dict.model.dtype = dtype
  conditional = is_class_conditional(model_name) and info.num_classes > 0
  config_dict.model.class_conditional = conditional
  config_dict.model.class_dropout_prob = 0.1 if conditional else 0.0
  for field, value in model_overrides.items():
    config_dict.model.overrides[field] = value
  config_dict.data.image_size = info.image_size
  config_dict.train.batch_size = batch_size
  config_dict.train.steps_per_dispatch = 1
  run = builder.build_run(config_dict, info=info)
  rng = np.random.default_rng(seed)
  host_batch = {
      "image": rng.uniform(-1, 1, (1, batch_size, info.image_size, info.image_size,
                                   info.channels)).astype(np.float32),
      "label": rng.integers(0, max(info.num_classes, 1), (1, batch_size)).astype(np.int32)}
  batches = jax.device_put(host_batch, sharding_lib.batch_sharding(run.mesh, leading_dims=1))
  return TrainBench(run=run, state=builder.init_state(run), step_fn=builder.make_step_fn(run),
                    batches=batches,
                    key=builder.root_key(seed, builder.TRAIN_STREAM, run.mesh))


def single_step_variant(bench: TrainBench) -> TrainBench:
  """The same `train_step`, jitted on one batch [B, ...] without `multi_step`'s `lax.scan`.

  Not what the CLI runs: an experiment showing what the length-1 scan costs (on XLA:CPU the
  U-Net's convolutions are much slower inside the loop). The keyword arguments mirror
  `jaxdiff.train.builder.make_step_fn`.
  """
  run, config = bench.run, bench.run.config
  step = functools.partial(
      step_lib.train_step, apply_fn=run.model.apply, tx=run.tx, lr_schedule=run.lr_schedule,
      schedule=run.schedule, diffusion=config.diffusion, conditional=config.model.class_conditional,
      learn_sigma=config.model.learn_sigma, ema_decays=config.train.ema_decays)
  step_fn = jax.jit(
      step, in_shardings=(run.shardings, sharding_lib.batch_sharding(run.mesh),
                          sharding_lib.replicated(run.mesh)),
      out_shardings=(run.shardings, sharding_lib.replicated(run.mesh)), donate_argnums=0)
  batches = jax.tree.map(lambda a: a[0], bench.batches)
  return dataclasses.replace(bench, step_fn=step_fn, batches=batches)


def forward_flops_per_image(model, params, info: DatasetInfo, conditional: bool) -> float:
  """Matmul + convolution FLOPs of one forward pass on one image (from the jaxpr)."""
  from experiments import common  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1, info.image_size, info.image_size, info.channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if conditional else None
  return common.jaxpr_flops(lambda p: model.apply({"params": p}, x, t, y), params)
