"""Tests for the train step, state, optimizer, sharding and metrics of jaxdiff.train.

References: closed-form AdamW/EMA/learning-rate math in NumPy, the same steps on 1 device and on
4 devices (data=4 and data=2 x fsdp=2), k steps in one scan against k single steps.
Most tests use a toy denoiser (with dropout and label dropout) that compiles in about a second;
the learning test trains the real dit-tiny.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff.config import DiffusionConfig, OptimizerConfig
from jaxdiff.diffusion import diffusion_loss, make_schedule, training_inputs
from jaxdiff.models import build_model
from jaxdiff.train import metrics as metrics_lib
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib

T = 50
DIFFUSION = DiffusionConfig(schedule="linear", num_timesteps=T, prediction="eps", loss_type="l2",
                            huber_delta=0.1, weighting="none", min_snr_gamma=5.0, vlb_weight=1e-3)
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


def setup(model, mesh, min_size=1, conditional=True, size=8):
  """(initial state, jitted k-step fn) of `model` on `mesh`."""
  tx, lr = state_lib.make_optimizer(OPTIMIZER, num_steps=100)
  init = state_lib.init_params_fn(model, size, 1, conditional)
  create = lambda: state_lib.create_state(init, tx, DECAYS, jax.random.key(0))
  shardings = sharding_lib.state_shardings(mesh, jax.eval_shape(create), min_size)
  state = jax.jit(create, out_shardings=shardings)()
  fn = step_lib.jit_train_step(
      mesh, shardings, apply_fn=model.apply, tx=tx, lr_schedule=lr,
      schedule=make_schedule("linear", T), diffusion=DIFFUSION, conditional=conditional,
      learn_sigma=False, ema_decays=DECAYS)
  return state, fn, shardings


def run_steps(mesh, batches, num_dispatches, min_size=1, keep_first=False):
  """Trains the toy on `batches` [n, B, ...] in `num_dispatches` calls of n/num_dispatches steps.

  Returns:
    (final state, losses [n], state shardings, host copies of the states before and after the
    first call if `keep_first`).
  """
  state, fn, shardings = setup(ToyDenoiser(), mesh, min_size)
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


@pytest.fixture(scope="module")
def reference():
  """Three single steps of the toy on one device (shared by the tests below)."""
  batches = toy_batch(3)
  state, losses, _, first = run_steps(sharding_lib.make_mesh(1, jax.devices()[:1]), batches, 3,
                                      keep_first=True)
  return batches, to_numpy(state), losses, first


@pytest.mark.parametrize("fsdp", [1, 2])
def test_same_losses_on_one_and_four_devices_with_data_and_fsdp_sharding(reference, fsdp):
  batches, reference_state, reference_losses, _ = reference
  devices = jax.devices()
  assert len(devices) == 4
  mesh = sharding_lib.make_mesh(fsdp, devices)
  state, losses, shardings, _ = run_steps(mesh, batches, 3)
  if fsdp == 2:  # Params, EMA and moments really are split over fsdp.
    for tree in (shardings.params, shardings.ema_params, shardings.opt_state):
      assert any("fsdp" in s.spec for s in jax.tree.leaves(tree))
    assert any("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses, reference_losses, rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               to_numpy(state.params), reference_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               to_numpy(state.ema_params), reference_state.ema_params)
  assert len(set(np.round(reference_losses, 6))) == 3  # the three steps really differ


def test_scan_of_k_steps_equals_k_single_steps(reference):
  batches, reference_state, reference_losses, _ = reference
  mesh = sharding_lib.make_mesh(1, jax.devices()[:1])
  scanned, scanned_losses, _, _ = run_steps(mesh, batches, 1)
  assert int(scanned.step) == int(reference_state.step) == 3
  np.testing.assert_allclose(scanned_losses, reference_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               to_numpy(scanned.params), reference_state.params)


def test_one_step_matches_closed_form_adamw_and_ema(reference):
  batches, _, _, ((before, after), metrics) = reference
  model = ToyDenoiser()
  batch = {name: v[:1] for name, v in batches.items()}
  key = jax.random.key(7)

  # Independent gradient: the same keys derived by hand, plain jax.grad of the mean loss.
  step_key = jax.random.fold_in(key, 0)
  x0, y = jnp.asarray(batch["image"][0]), jnp.asarray(batch["label"][0])
  keys = jnp.stack([jax.random.fold_in(step_key, i) for i in range(8)])
  t, noise = training_inputs(make_schedule("linear", T), keys, x0)
  rngs = {"dropout": jax.random.fold_in(step_key, 2**31 - 1)}

  def loss(params):
    fn = lambda x, tt: model.apply({"params": params}, x, tt, y, train=True, rngs=rngs)
    return jnp.mean(diffusion_loss(fn, make_schedule("linear", T), x0, t, noise)[0])

  value, grads = jax.jit(jax.value_and_grad(loss))(before.params)
  grads = to_numpy(grads)
  np.testing.assert_allclose(float(metrics["train/loss"][0]), float(value), rtol=1e-6)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(float(metrics["train/grad_norm"][0]), norm, rtol=1e-5)
  assert norm > OPTIMIZER.grad_clip_norm  # so clipping is exercised
  scale = OPTIMIZER.grad_clip_norm / norm
  lr, eps, wd = OPTIMIZER.learning_rate, OPTIMIZER.eps, OPTIMIZER.weight_decay

  def adamw_first_step(p, g):
    # Bias-corrected first Adam step: m_hat = g, v_hat = g^2; decoupled weight decay.
    g = g.astype(np.float64) * scale
    return p - lr * (g / (np.abs(g) + eps) + wd * p)

  expected = jax.tree.map(adamw_first_step, before.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
               after.params, expected)
  for decay in DECAYS:
    name = state_lib.ema_key(decay)
    closed_form = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p,
                               before.ema_params[name], after.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 after.ema_params[name], closed_form)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), after.ema_params[name],
                         before.ema_params[name])
    assert max(jax.tree.leaves(moved)) > 0
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(after.ema_params[name]))
  assert int(before.step) == 0 and int(after.step) == 1


def test_learning_rate_schedule_closed_form():
  cosine = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="cosine",
                           end_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                           grad_clip_norm=0.0)
  schedule = state_lib.learning_rate_schedule(cosine, num_steps=110)
  for step in (0, 5, 10):
    np.testing.assert_allclose(float(schedule(step)), step / 10, rtol=1e-6)
  for step in (35, 60, 110):
    progress = (step - 10) / 100
    expected = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_param_spec_shards_the_largest_divisible_axis():
  assert sharding_lib.param_spec((3, 3, 16, 64), fsdp=4, min_size=1) == P(None, None, None, "fsdp")
  assert sharding_lib.param_spec((64, 6), fsdp=4, min_size=1) == P("fsdp", None)
  assert sharding_lib.param_spec((7, 5), fsdp=4, min_size=1) == P()
  assert sharding_lib.param_spec((64, 64), fsdp=4, min_size=10_000) == P()
  assert sharding_lib.param_spec((64, 64), fsdp=1, min_size=1) == P()
  assert sharding_lib.param_spec((), fsdp=2, min_size=0) == P()


def test_history_finds_the_first_non_finite_step_and_averages_quartiles():
  history = metrics_lib.History()
  ok = {"train/loss": np.array([1.0, 3.0]), "train/grad_norm": np.array([1.0, 1.0]),
        **{f"train/loss_q{q}_sum": np.array([q, 0.0]) for q in range(4)},
        **{f"train/loss_q{q}_count": np.array([1.0, 0.0]) for q in range(3)},
        "train/loss_q3_count": np.array([0.0, 0.0])}
  history.add(0, ok)
  values = history.flush()
  assert values["train/loss"] == 2.0 and values["train/loss_q2"] == 2.0
  assert "train/loss_q3" not in values  # never drawn: no value rather than 0/0
  history.add(10, ok)
  history.add(12, {**ok, "train/grad_norm": np.array([1.0, np.inf])})
  with pytest.raises(metrics_lib.NonFiniteLossError) as error:
    history.flush()
  assert (error.value.name, error.value.step) == ("train/grad_norm", 14)


def test_real_model_loss_drops_well_below_its_initial_value():
  mesh = sharding_lib.make_mesh(1, jax.devices()[:1])
  model = build_model("dit-tiny", patch_size=2)
  tx, lr = state_lib.make_optimizer(
      OptimizerConfig(learning_rate=3e-3, warmup_steps=10, decay="constant", end_lr_fraction=0.0,
                      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0), 300)
  init = state_lib.init_params_fn(model, 8, 1, conditional=False)
  create = lambda: state_lib.create_state(init, tx, (0.99,), jax.random.key(0))
  shardings = sharding_lib.state_shardings(mesh, jax.eval_shape(create), 1)
  state = jax.jit(create, out_shardings=shardings)()
  fn = step_lib.jit_train_step(
      mesh, shardings, apply_fn=model.apply, tx=tx, lr_schedule=lr,
      schedule=make_schedule("linear", 100), diffusion=DIFFUSION, conditional=False,
      learn_sigma=False, ema_decays=(0.99,))
  # Toy data: two fixed 8x8 patterns (a bar and its negative).
  pattern = np.where(np.arange(8)[:, None] < 4, 1.0, -1.0) * np.ones((8, 8))
  images = np.stack([pattern, -pattern] * 4)[..., None].astype(np.float32)
  chunk = {"image": np.broadcast_to(images, (100, 8, 8, 8, 1)),
           "label": np.zeros((100, 8), np.int32)}
  batch = sharding_lib.global_batch(chunk, sharding_lib.batch_sharding(mesh, 1))
  key = jax.device_put(jax.random.key(3), sharding_lib.replicated(mesh))
  losses = []
  for _ in range(3):
    state, metrics = fn(state, batch, key)
    losses.extend(np.asarray(metrics["train/loss"]).tolist())
  initial, final = np.mean(losses[:10]), np.mean(losses[-50:])
  assert np.isfinite(losses).all()
  assert final < 0.5 * initial, (initial, final)
