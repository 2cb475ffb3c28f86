"""Builds jaxdiff's real jitted train step for a benchmark, on a synthetic 32x32x3 batch.

The step is the one `python -m jaxdiff.train` runs (`jaxdiff.train.loop.make_step_fn`: the
sharded, donated `multi_step` over `train_step`, with AdamW, gradient clipping and one EMA),
built from `configs/base.py` with a few overrides. Only the dataset is replaced: a CIFAR-10-shaped
`DatasetInfo` (32x32x3, 10 classes) and a fixed random batch, so no data has to be on disk.
"""

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.config import check_run, parse_config
from jaxdiff.data import DatasetInfo
from jaxdiff.diffusion import make_schedule
from jaxdiff.train import checkpoint, loop
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import step as step_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_INFO = DatasetInfo(image_size=32, channels=3, num_classes=10, num_examples=50_000)


def base_config(arg: str | None = None):
  """`configs/base.py`'s ConfigDict (the configs folder is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "jaxdiff_base_config", os.path.join(_REPO, "configs", "base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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
    **model_overrides: module fields beyond the config's overrides (e.g. scan_blocks=True).
  """
  config_dict = base_config()
  config_dict.model.name = model_name
  config_dict.model.dtype = dtype
  conditional = is_class_conditional(model_name) and info.num_classes > 0
  config_dict.model.class_conditional = conditional
  config_dict.model.class_dropout_prob = 0.1 if conditional else 0.0
  config_dict.data.image_size = info.image_size
  config_dict.train.batch_size = batch_size
  config_dict.train.steps_per_dispatch = 1
  config = parse_config(config_dict)
  if model_overrides:
    model = dataclasses.replace(
        config.model, overrides={**config.model.overrides, **model_overrides})
    config = dataclasses.replace(config, model=model)
  devices = jax.devices()
  check_run(config, info, len(devices), jax.process_count())
  mesh = sharding_lib.make_mesh(config.mesh.fsdp, devices)
  shardings_fn = lambda tree: sharding_lib.state_shardings(mesh, tree, config.mesh.fsdp_min_size)
  model, tx, lr_schedule, shapes = checkpoint.abstract_state(config, info, shardings_fn)
  run = loop.Run(config_dict=config_dict, config=config, info=info, mesh=mesh, model=model,
                 tx=tx, lr_schedule=lr_schedule, abstract_state=shapes,
                 shardings=jax.tree.map(lambda s: s.sharding, shapes))
  rng = np.random.default_rng(seed)
  host_batch = {
      "image": rng.uniform(-1, 1, (1, batch_size, info.image_size, info.image_size,
                                   info.channels)).astype(np.float32),
      "label": rng.integers(0, max(info.num_classes, 1), (1, batch_size)).astype(np.int32)}
  batches = jax.device_put(host_batch, sharding_lib.batch_sharding(mesh, leading_dims=1))
  return TrainBench(run=run, state=loop.init_state(run), step_fn=loop.make_step_fn(run),
                    batches=batches, key=loop.root_key(seed, loop.TRAIN_STREAM, mesh))


def single_step_variant(bench: TrainBench) -> TrainBench:
  """The same `train_step`, jitted on one batch [B, ...] without `multi_step`'s `lax.scan`.

  Not what the CLI runs: an experiment showing what the length-1 scan costs (on XLA:CPU the
  U-Net's convolutions are much slower inside the loop). The keyword arguments mirror
  `jaxdiff.train.loop.make_step_fn`.
  """
  run, config = bench.run, bench.run.config
  step = functools.partial(
      step_lib.train_step, apply_fn=run.model.apply, tx=run.tx, lr_schedule=run.lr_schedule,
      schedule=make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps),
      diffusion=config.diffusion, conditional=config.model.class_conditional,
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
