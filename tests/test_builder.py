"""jaxdiff.train.builder: one config -> model, schedule, shardings, state, jitted step, sampler.

References: the config's own numbers (schedule tables rebuilt with `make_schedule`, parameter
shapes from `model.init`), the run's shardings on a (data, fsdp) mesh, and the sample CLI's
sampler driven by hand with the stream's key.
"""

import jax
import numpy as np
import pytest

from configs import base
from jaxdiff import diffusion, sampling
from jaxdiff.config import ConfigError
from jaxdiff.train import builder
from jaxdiff.train import state as state_lib


def tiny_config(**fields):
  """dit-tiny on 8x8 offline MNIST, class-conditional with label dropout."""
  config = base.get_config("tiny")
  config.data.image_size = 8
  config.model.class_conditional = True
  config.model.class_dropout_prob = 0.1
  config.mesh.fsdp_min_size = 1
  for dotted, value in fields.items():
    section, field = dotted.split("__")
    config[section][field] = value
  return config


def test_run_holds_what_the_config_asks_for():
  run = builder.build_run(tiny_config(mesh__fsdp=2))
  assert run.mesh.shape == {"data": 2, "fsdp": 2}
  assert (run.info.image_size, run.info.channels, run.info.num_classes) == (8, 1, 10)
  assert run.model.num_classes == 10 and run.model.class_dropout_prob == 0.1
  expected = diffusion.make_schedule("linear", 100)
  np.testing.assert_array_equal(run.schedule.alphas_cumprod, expected.alphas_cumprod)
  # The abstract state is the model's own parameters, laid out with the run's shardings.
  x, t, y = np.zeros((1, 8, 8, 1)), np.zeros((1,)), np.zeros((1,), np.int32)
  params = jax.eval_shape(lambda: run.model.init(jax.random.key(0), x, t, y))["params"]
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(f"{a} {b}"),
               params, run.abstract_state.params)
  specs = [str(s.spec) for s in jax.tree.leaves(run.shardings.params)]
  assert any("fsdp" in spec for spec in specs)
  assert all(leaf.sharding == sharding for leaf, sharding in zip(
      jax.tree.leaves(run.abstract_state), jax.tree.leaves(run.shardings)))


def test_bad_batch_is_refused_before_anything_is_built():
  with pytest.raises(ConfigError, match=r"train\.batch_size=6.*device count 4"):
    builder.build_run(tiny_config(train__batch_size=6))


def test_init_state_is_sharded_and_the_step_runs_and_counts():
  run = builder.build_run(tiny_config(), devices=jax.devices()[:2])
  state = builder.init_state(run)
  again = builder.init_state(run)
  jax.tree.map(np.testing.assert_array_equal, state.params, again.params)  # seeded, not random
  # Compiled without LLVM's optimisations: the fully optimised program's values, to a few float32
  # ulps (a fused multiply-add may round once instead of twice).
  create = lambda: state_lib.create_state(
      state_lib.init_params_fn(run.model, 8, 1, True), run.tx, run.config.train.ema_decays,
      jax.random.fold_in(jax.random.key(run.config.seed), builder.INIT_STREAM))
  optimised = jax.jit(create, out_shardings=run.shardings)()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), state,
               optimised)
  assert {d for leaf in jax.tree.leaves(state) for d in leaf.sharding.device_set} == set(
      jax.devices()[:2])
  batches = {"image": np.zeros((1, 8, 8, 8, 1), np.float32), "label": np.zeros((1, 8), np.int32)}
  key = builder.root_key(0, builder.TRAIN_STREAM, run.mesh)
  state, metrics = builder.make_step_fn(run)(state, batches, key)
  assert int(state.step) == 1 and metrics["train/loss"].shape == (1,)
  assert np.isfinite(np.asarray(metrics["train/loss"])).all()


def test_ema_sampler_is_the_sample_clis_sampler_on_the_streams_key():
  run = builder.build_run(tiny_config(), devices=jax.devices()[:1])
  state = builder.init_state(run)
  generate = builder.make_ema_sampler(run, builder.PREVIEW_STREAM, batch_size=3)
  got = generate(state, 5)
  tail = generate(state, 2, first_index=3)
  ema = state.ema_params[state_lib.ema_key(run.config.sample.ema_decay)]
  model = sampling.DiffusionModel.from_module(run.model, None, run.schedule, "eps", (8, 8, 1))
  key = jax.random.fold_in(jax.random.key(0), builder.PREVIEW_STREAM)
  batch_fn = sampling.make_batch_fn(model, run.config.sample.sampler)
  want = jax.jit(batch_fn)(ema, jax.random.key_data(key), np.arange(5, dtype=np.int32),
                           np.arange(5, dtype=np.int32))  # labels i % 10
  np.testing.assert_array_equal(got, sampling.images.to_uint8(want))
  np.testing.assert_array_equal(tail, got[3:])
