"""A toy denoiser and the helpers that train it, shared by test_step.py and test_sharding.py.

The toy (with dropout and label dropout) compiles in about a second. `reference_steps` trains it
for three single steps on one device; tests/conftest.py runs it once per session as the
`toy_reference` fixture that the step and sharding tests compare against.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.config import DiffusionConfig, OptimizerConfig
from jaxdiff.diffusion import make_schedule
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

T = 50
DIFFUSION = DiffusionConfig(
    objective="ddpm", schedule="linear", num_timesteps=T, prediction="eps", loss_type="l2",
    huber_delta=0.1, weighting="none", min_snr_gamma=5.0, vlb_weight=1e-3,
    flow_timestep_sampling="uniform", flow_logit_mean=0.0, flow_logit_std=1.0,
    flow_mode_scale=1.29, flow_shift=1.0, edm_p_mean=-1.2, edm_p_std=1.2, edm_sigma_data=0.5)
# Flow matching with every option away from its default (logit-normal t, shifted).
FLOW = dataclasses.replace(DIFFUSION, objective="flow", flow_timestep_sampling="logit_normal",
                           flow_logit_mean=0.3, flow_logit_std=0.8, flow_shift=2.0)
# eps = 1e-2 keeps g / (|g| + eps) well conditioned for tiny float32 gradients (closed-form test).
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay="constant",
                            end_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-2, weight_decay=0.01,
                            grad_clip_norm=0.1)
DECAYS = (0.5, 0.9)


class ToyDenoiser(nn.Module):
  """Conv denoiser with time and label embeddings, dropout and label dropout (null = 3)."""
  num_classes: int = 3
  class_dropout_prob: float = 0.3

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    if train:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout_prob, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    h = nn.Conv(16, (3, 3))(x)
    h = h + nn.Dense(16)(jnp.asarray(t, jnp.float32)[:, None] / T)[:, None, None, :]
    h = h + nn.Embed(self.num_classes + 1, 16)(y)[:, None, None, :]
    h = nn.Dropout(0.2, deterministic=not train)(nn.gelu(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def toy_batch(num_batches: int, batch: int = 8, size: int = 8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(-1, 1, (num_batches, batch, size, size, 1)).astype(np.float32),
          "label": rng.integers(0, 3, (num_batches, batch)).astype(np.int32)}


def setup(model, mesh, min_size=1, conditional=True, size=8, diffusion=DIFFUSION):
  """(initial state, jitted k-step fn) of `model` on `mesh`, trained with `diffusion`."""
  tx, lr = state_lib.make_optimizer(OPTIMIZER, num_steps=100)
  init = state_lib.init_params_fn(model, size, 1, conditional)
  create = lambda: state_lib.create_state(init, tx, DECAYS, jax.random.key(0))
  shardings = sharding_lib.state_shardings(mesh, jax.eval_shape(create), min_size)
  state = jax.jit(create, out_shardings=shardings)()
  fn = step_lib.jit_train_step(
      mesh, shardings, apply_fn=model.apply, tx=tx, lr_schedule=lr,
      schedule=make_schedule("linear", T), diffusion=diffusion, conditional=conditional,
      learn_sigma=False, ema_decays=DECAYS)
  return state, fn, shardings


def run_steps(mesh, batches, num_dispatches, min_size=1, keep_first=False, diffusion=DIFFUSION):
  """Trains the toy on `batches` [n, B, ...] in `num_dispatches` calls of n/num_dispatches steps
  with the objective of `diffusion`.

  Returns:
    (final state, losses [n], state shardings, host copies of the states before and after the
    first call if `keep_first`).
  """
  state, fn, shardings = setup(ToyDenoiser(), mesh, min_size, diffusion=diffusion)
  key = jax.device_put(jax.random.key(7), sharding_lib.replicated(mesh))
  k = batches["image"].shape[0] // num_dispatches
  losses, first = [], []
  for i in range(num_dispatches):
    if keep_first and i < 2:
      first.append(to_numpy(state))  # copied before the call donates the buffers
    chunk = {name: v[i * k:(i + 1) * k] for name, v in batches.items()}
    state, metrics = fn(state, sharding_lib.global_batch(
        chunk, sharding_lib.batch_sharding(mesh, 1)), key)
    losses.append(np.asarray(metrics["train/loss"]))
    if i == 0:
      first_metrics = jax.device_get(metrics)
  return state, np.concatenate(losses), shardings, (first, first_metrics)


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def reference_steps(num_steps=3, diffusion=DIFFUSION):
  """`num_steps` single steps of the toy on one device, trained with `diffusion`.

  Returns:
    (batches, final state on the host, losses [num_steps], (host states before and after the
    first step, metrics of the first step)).
  """
  batches = toy_batch(num_steps)
  state, losses, _, first = run_steps(sharding_lib.make_mesh(1, jax.devices()[:1]), batches,
                                      num_steps, keep_first=True, diffusion=diffusion)
  return batches, to_numpy(state), losses, first
