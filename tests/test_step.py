"""Tests of jaxdiff.train.step: the jitted train step and its scan over steps.

References: closed-form AdamW/EMA math in NumPy on an independent jax.grad of the loss, k steps in
one scan against k single steps (the `toy_reference` fixture of tests/conftest.py), the flow and
EDM losses written out by hand from the same keys, and the real dit-tiny learning two fixed
patterns.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff.config import OptimizerConfig
from jaxdiff.diffusion import diffusion_loss, make_schedule, training_inputs
from jaxdiff.models import build_model
from jaxdiff.train import sharding as sharding_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib
from toy_training import (DECAYS, DIFFUSION, FLOW, OPTIMIZER, T, ToyDenoiser, reference_steps,
                          run_steps, to_numpy)

EDM = dataclasses.replace(DIFFUSION, objective="edm", edm_p_mean=-0.5, edm_p_std=1.5,
                          edm_sigma_data=0.7)


def test_scan_of_k_steps_equals_k_single_steps(toy_reference):
  batches, reference_state, reference_losses, _ = toy_reference
  mesh = sharding_lib.make_mesh(1, jax.devices()[:1])
  scanned, scanned_losses, _, _ = run_steps(mesh, batches, 1)
  assert int(scanned.step) == int(reference_state.step) == 3
  np.testing.assert_allclose(scanned_losses, reference_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               to_numpy(scanned.params), reference_state.params)


def test_one_step_matches_closed_form_adamw_and_ema(toy_reference):
  batches, _, _, ((before, after), metrics) = toy_reference
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


def _flow_losses_by_hand(network, x0, keys, config):
  """Per-example flow-matching losses [B]: t = shift(sigmoid(m + s n)), v = ε - x_0, model at t·T."""
  draws = [jax.random.split(key) for key in keys]
  n = jnp.stack([jax.random.normal(k[0], ()) for k in draws])
  t = jax.nn.sigmoid(config.flow_logit_mean + config.flow_logit_std * n)
  t = config.flow_shift * t / (1 + (config.flow_shift - 1) * t)
  noise = jnp.stack([jax.random.normal(k[1], x0.shape[1:]) for k in draws])
  tt = t[:, None, None, None]
  prediction = network((1 - tt) * x0 + tt * noise, t * T)
  return jnp.mean((prediction - (noise - x0))**2, axis=(1, 2, 3)), t


def _edm_losses_by_hand(network, x0, keys, config):
  """Per-example EDM losses [B] (Karras et al. Table 1 and eq. 8) and ln σ [B]."""
  draws = [jax.random.split(key) for key in keys]
  log_sigma = config.edm_p_mean + config.edm_p_std * jnp.stack(
      [jax.random.normal(k[0], ()) for k in draws])
  sigma, sigma_data = jnp.exp(log_sigma), config.edm_sigma_data
  s = sigma[:, None, None, None]
  x = x0 + s * jnp.stack([jax.random.normal(k[1], x0.shape[1:]) for k in draws])
  scale = jnp.sqrt(s**2 + sigma_data**2)
  denoised = sigma_data**2 / scale**2 * x + s * sigma_data / scale * network(x / scale,
                                                                            log_sigma / 4)
  weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2
  return weight * jnp.mean((denoised - x0)**2, axis=(1, 2, 3)), log_sigma


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_flow_and_edm_losses_in_the_step_equal_the_losses_written_out(objective, request):
  if objective == "flow":
    config = FLOW
    batches, _, _, (states, metrics) = request.getfixturevalue("flow_reference")
  else:
    config = EDM
    batches, _, _, (states, metrics) = reference_steps(1, EDM)
  before, model = states[0], ToyDenoiser()  # the state before the first step
  step_key = jax.random.fold_in(jax.random.key(7), 0)  # run_steps' key, step 0
  rngs = {"dropout": jax.random.fold_in(step_key, 2**31 - 1)}
  x0, y = jnp.asarray(batches["image"][0]), jnp.asarray(batches["label"][0])
  network = lambda x, t: model.apply({"params": before.params}, x, t, y, train=True, rngs=rngs)
  by_hand = _flow_losses_by_hand if objective == "flow" else _edm_losses_by_hand
  keys = [jax.random.fold_in(step_key, i) for i in range(8)]
  losses, time = jax.device_get(by_hand(network, x0, keys, config))
  if objective == "edm":  # quartiles of σ under its training distribution
    time = stats.norm.cdf((time.astype(np.float64) - config.edm_p_mean) / config.edm_p_std)
  np.testing.assert_allclose(float(metrics["train/loss"][0]), losses.mean(), rtol=1e-5)
  bins = np.minimum((time * 4).astype(int), 3)
  assert len(set(bins)) > 1  # the per-example losses are told apart
  for q in range(4):
    np.testing.assert_allclose(float(metrics[f"train/loss_q{q}_sum"][0]),
                               losses[bins == q].sum(), rtol=1e-5, atol=1e-6)
    assert float(metrics[f"train/loss_q{q}_count"][0]) == np.sum(bins == q)


def test_caption_dropout_draws_each_example_from_its_own_key_at_rate_p():
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(4000))
  context, null = jnp.ones((4000, 2, 3)), jnp.full((2, 3), -1.0)
  out, dropped = step_lib.caption_dropout(context, null, keys, 0.25)
  dropped = np.asarray(dropped)
  assert stats.binomtest(int(dropped.sum()), 4000, 0.25).pvalue > 1e-3
  np.testing.assert_array_equal(np.asarray(out)[dropped], -np.ones((dropped.sum(), 2, 3)))
  np.testing.assert_array_equal(np.asarray(out)[~dropped], np.ones(((~dropped).sum(), 2, 3)))
  for i in (0, 17, 3999):  # bernoulli(fold_in(key_i, CAPTION_STREAM), p), nothing else
    assert dropped[i] == jax.random.bernoulli(
        jax.random.fold_in(keys[i], step_lib.CAPTION_STREAM), 0.25)
  _, part = step_lib.caption_dropout(context[100:200], null, keys[100:200], 0.25)
  np.testing.assert_array_equal(np.asarray(part), dropped[100:200])  # any batch split


class _TextToy(nn.Module):
  """A denoiser whose output depends on the text context [B, L, D] (as UNetCond's)."""

  @nn.compact
  def __call__(self, x, t, context, train=False):
    del train
    gate = nn.Dense(x.shape[-1])(context.mean(axis=1))[:, None, None, :]
    return nn.Dense(x.shape[-1])(x) * gate + 0.01 * t[:, None, None, None]


def test_the_step_feeds_each_example_its_context_or_after_dropout_the_empty_prompt():
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 4, 4, 2)).astype(np.float32),
           "label": np.arange(8, dtype=np.int32),
           "context": rng.normal(size=(8, 3, 5)).astype(np.float32)}
  null = rng.normal(size=(3, 5)).astype(np.float32)
  model = _TextToy()
  tx, lr = state_lib.make_optimizer(OPTIMIZER, 10)
  init = lambda key: model.init(key, batch["image"][:1], jnp.zeros((1,)),
                                batch["context"][:1])["params"]
  state = state_lib.create_state(init, tx, DECAYS, jax.random.key(0))
  kwargs = dict(apply_fn=model.apply, tx=tx, lr_schedule=lr,
                schedule=make_schedule("linear", T), diffusion=DIFFUSION, conditional=False,
                learn_sigma=False, ema_decays=DECAYS)
  key = jax.random.key(1)
  with_dropout, _ = step_lib.train_step(state, batch, key, caption_dropout_prob=0.5,
                                        null_context=null, **kwargs)
  # The same step written out: the dropped rows replaced by hand, no dropout in the step.
  example_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, state.step),
                                                         jnp.arange(8))
  dropped = np.asarray([jax.random.bernoulli(jax.random.fold_in(k, step_lib.CAPTION_STREAM),
                                             0.5) for k in example_keys])
  assert 0 < dropped.sum() < 8
  replaced = {**batch, "context": np.where(dropped[:, None, None], null, batch["context"])}
  by_hand, _ = step_lib.train_step(state, replaced, key, **kwargs)
  without, _ = step_lib.train_step(state, batch, key, **kwargs)
  # Equal up to float32 rounding: the step's in-graph select and the replaced input may fuse
  # differently (1 ulp seen); feeding a wrong row moves the params by orders of magnitude more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               with_dropout.params, by_hand.params)
  assert not np.allclose(with_dropout.params["Dense_0"]["kernel"],
                         without.params["Dense_0"]["kernel"])


def _autoencoder_step(devices, fsdp):
  """One step of configs/mnist_autoencoder.py:tiny through build_run's jitted step on `devices`.

  Returns:
    (the run, params before the step on the host, the step's metrics on the host, the batch).
  """
  from configs import mnist_autoencoder  # pylint: disable=g-import-not-at-top
  from jaxdiff.data import DatasetInfo  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import builder  # pylint: disable=g-import-not-at-top
  config = mnist_autoencoder.get_config("tiny")
  config.mesh.fsdp_min_size = 1
  config.mesh.fsdp = fsdp
  info = DatasetInfo(image_size=16, channels=1, num_classes=0, num_examples=100)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 8, 16, 16, 1)).astype(np.float32)
  run = builder.build_run(config, info=info, devices=devices)
  state = builder.init_state(run)
  before = to_numpy(state.params)
  batch = sharding_lib.global_batch({"image": x, "label": np.zeros((1, 8), np.int32)},
                                    sharding_lib.batch_sharding(run.mesh, 1))
  key = builder.root_key(config.seed, builder.TRAIN_STREAM, run.mesh)
  _, metrics = builder.make_step_fn(run)(state, batch, key)
  return run, before, jax.device_get(metrics), x[0]


@pytest.mark.slow  # compiles the autoencoder's step twice (about 45 s on 2 cores)
def test_autoencoder_step_draws_each_posterior_from_its_example_key():
  """task=autoencoder through build_run's step: the loss is `autoencoder_loss` with z_i drawn
  from fold_in(fold_in(train key, step), i)."""
  from jaxdiff.models.autoencoder import autoencoder_loss  # pylint: disable=g-import-not-at-top
  from jaxdiff.train import builder  # pylint: disable=g-import-not-at-top
  run, params, metrics, x = _autoencoder_step(jax.devices()[:1], 1)
  assert not any(name.startswith("train/loss_q") for name in metrics)
  train_key = jax.random.fold_in(jax.random.key(run.config.seed), builder.TRAIN_STREAM)
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(train_key, 0), i) for i in range(8)])
  loss, parts = autoencoder_loss(run.model.apply, params, jnp.asarray(x), keys, loss_type="l1",
                                 kl_weight=run.config.autoencoder.kl_weight)
  np.testing.assert_allclose(metrics["train/loss"][0], np.mean(loss), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/reconstruction"][0],
                             np.mean(parts["reconstruction"]), rtol=1e-5)
  np.testing.assert_allclose(metrics["train/kl"][0], np.mean(parts["kl"]), rtol=1e-5)
  other = jnp.stack([jax.random.fold_in(jax.random.fold_in(train_key, 1), i) for i in range(8)])
  moved, _ = autoencoder_loss(run.model.apply, params, jnp.asarray(x), other)
  assert abs(float(np.mean(moved)) - float(metrics["train/loss"][0])) > 1e-6  # the draw counts


@pytest.mark.slow  # two more compilations of the autoencoder step (about a minute on 2 cores)
def test_autoencoder_step_is_the_same_on_1_and_4_devices():
  _, _, one, _ = _autoencoder_step(jax.devices()[:1], 1)
  _, _, four, _ = _autoencoder_step(jax.devices(), 2)
  for name in ("train/loss", "train/kl", "train/grad_norm"):
    np.testing.assert_allclose(four[name], one[name], rtol=1e-5)
