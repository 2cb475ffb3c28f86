"""jaxdiff.sampling: the one sharded sampler, device-count independent, with guidance.

References: a hand-written re-derivation of the per-example keys and of classifier-free guidance
(for the ddpm, flow and EDM samplers), the same run on 1 and 4 devices and on a (data, fsdp)
mesh, and hand-computed uint8 values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion, sampling
from jaxdiff.train.sharding import make_mesh

SHAPE = (4, 4, 2)


class ToyDenoiser(nn.Module):
  """A conditional denoiser that compiles in a fraction of a second (null label = num_classes)."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    del train
    y = jnp.full(x.shape[:1], self.num_classes) if y is None else y
    h = nn.Conv(x.shape[-1], (3, 3))(x) * (1.0 + jnp.asarray(t, jnp.float32) / 50.0)[:, None,
                                                                                     None, None]
    return jnp.tanh(h + nn.Embed(self.num_classes + 1, x.shape[-1])(y)[:, None, None, :])


@pytest.fixture(scope="module")
def toy():
  """(DiffusionModel, guided DDPM batch_fn): stochastic steps, so step noise is exercised too."""
  module = ToyDenoiser()
  x = jnp.zeros((1, *SHAPE))
  params = jax.jit(module.init)(jax.random.key(1), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  model = sampling.DiffusionModel(
      module, params["params"], diffusion.make_schedule("linear", 100), "eps", SHAPE,
      num_classes=3, has_null_label=True)
  settings = sampling.SamplerSettings(method="ddpm", num_steps=3, guidance_scale=2.5)
  return model, sampling.make_batch_fn(model, settings)


def test_same_samples_on_one_and_four_devices_any_batching(toy):
  model, batch_fn = toy
  labels = sampling.example_labels(6, (), model.num_classes)
  seed0, seed1 = sampling.seed_key_data(0), sampling.seed_key_data(1)
  one = sampling.make_sampler(batch_fn, make_mesh(1, jax.devices()[:1]), batch_size=6)(
      model.params, labels, seed0)
  mesh4 = make_mesh()
  assert mesh4.devices.size == 4
  # Batches of 4 over 4 devices: two calls, the second one padded with 2 dropped samples.
  sample4 = sampling.make_sampler(batch_fn, mesh4, batch_size=4)
  four = sample4(model.params, labels, seed0)
  prefix = sample4(model.params, labels[:3], seed0)
  other_seed = sample4(model.params, labels, seed1)
  # A 2 x 2 (data, fsdp) mesh as in training, and a chunk that starts at a later index.
  fsdp_mesh = make_mesh(2)
  tail = sampling.make_sampler(batch_fn, fsdp_mesh, batch_size=3)(
      model.params, labels[2:], seed0, first_index=2)
  assert one.shape == (6, *SHAPE) and one.dtype == np.uint8
  assert one.std() > 10  # Not a constant image.
  np.testing.assert_array_equal(one, four)
  np.testing.assert_array_equal(prefix, one[:3])
  np.testing.assert_array_equal(tail, one[2:])
  assert np.mean(other_seed != one) > 0.5


def test_batch_fn_matches_explicit_keys_and_guidance(toy):
  """Re-derives x_T, the sampler keys and the guided model independently of sampling.py."""
  model, batch_fn = toy
  seed, indices, labels = 7, np.array([5, 0, 9], np.int32), np.array([2, 0, 1], np.int32)
  got = jax.jit(batch_fn)(model.params, sampling.seed_key_data(seed), indices, labels)

  @jax.jit
  def reference():
    keys = [jax.random.split(jax.random.fold_in(jax.random.key(seed), int(i))) for i in indices]
    x_T = jnp.stack([jax.random.normal(k[0], SHAPE) for k in keys])

    def guided(x, t):
      apply = lambda y: model.module.apply({"params": model.params}, x, t, y)
      cond, uncond = apply(jnp.asarray(labels)), apply(jnp.full((3,), 3))
      return uncond + 2.5 * (cond - uncond)

    return diffusion.sample(guided, model.schedule, x_T, jnp.stack([k[1] for k in keys]),
                            method="ddpm", num_steps=3)

  np.testing.assert_allclose(got, reference(), atol=1e-5)


# (objective, settings, what the sampler is called with besides the model, x_T and keys).
CONTINUOUS = [
    ("flow", sampling.SamplerSettings(
        method="euler_maruyama", num_steps=3, guidance_scale=2.5, guidance_interval=(20.0, 80.0),
        guidance_rescale=0.5, diffusion_scale=0.7),
     dict(method="euler_maruyama", num_steps=3, shift=2.0, num_timesteps=100,
          diffusion_scale=0.7, guidance_interval=(20.0, 80.0), guidance_rescale=0.5)),
    ("edm", sampling.SamplerSettings(
        method="heun", num_steps=3, guidance_scale=2.5, guidance_interval=(0.1, 10.0),
        guidance_rescale=0.5, sigma_min=0.01, sigma_max=20.0, rho=5.0, s_churn=2.0, s_min=0.05,
        s_max=15.0, s_noise=1.01),
     dict(num_steps=3, sigma_min=0.01, sigma_max=20.0, rho=5.0, s_churn=2.0, s_min=0.05,
          s_max=15.0, s_noise=1.01, guidance_interval=(0.1, 10.0), guidance_rescale=0.5)),
]


@pytest.mark.parametrize("objective,settings,expected_kwargs", CONTINUOUS, ids=["flow", "edm"])
def test_batch_fn_of_flow_and_edm_models_calls_their_samplers_with_the_same_keys(
    toy, objective, settings, expected_kwargs):
  """sampling's flow / EDM path against sample_flow / sample_edm called on hand-derived inputs."""
  ddpm_model, _ = toy
  model = sampling.DiffusionModel(
      ddpm_model.module, ddpm_model.params, ddpm_model.schedule, "eps", SHAPE, num_classes=3,
      has_null_label=True, objective=objective, sigma_data=0.7,
      scheduler_kwargs={"shift": 2.0} if objective == "flow" else {})
  seed, indices, labels = 3, np.array([4, 1, 8], np.int32), np.array([1, 2, 0], np.int32)
  got = jax.jit(sampling.make_batch_fn(model, settings))(
      model.params, sampling.seed_key_data(seed), indices, labels)

  @jax.jit
  def reference():
    keys = [jax.random.split(jax.random.fold_in(jax.random.key(seed), int(i))) for i in indices]
    x_T = jnp.stack([jax.random.normal(k[0], SHAPE) for k in keys])
    both = jnp.concatenate([jnp.asarray(labels), jnp.full((3,), 3)])  # cond, then null label
    network = lambda x, t: model.module.apply({"params": model.params}, x, t, both)
    if objective == "flow":
      return diffusion.flow.sample_flow(network, x_T, jnp.stack([k[1] for k in keys]),
                                        guidance_scale=2.5, **expected_kwargs)

    def denoiser(x, sigma):  # EDM Table 1 with sigma_data = 0.7
      scale = jnp.sqrt(sigma**2 + 0.49)[:, None, None, None]
      out = network(x / scale, jnp.log(sigma) / 4)
      return 0.49 / scale**2 * x + sigma[:, None, None, None] * 0.7 / scale * out
    return diffusion.edm.sample_edm(denoiser, x_T, jnp.stack([k[1] for k in keys]),
                                    guidance_scale=2.5, **expected_kwargs)

  want = reference()
  assert np.isfinite(want).all() and np.std(want) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantisation_order_and_padding():
  """A stub sampler that returns hand-picked values: 12 samples in batches of 5 on 4 devices."""
  values = np.array([-1.0, 1.0, 0.0, 0.999, -0.999, 1.7, -2.5, 0.5, -0.5, 0.25,
                     # (x + 1) * 127.5 is exactly 64.5 in float32 (64.500004 in float64):
                     # round half to even gives 64, rounding half up or float64 math 65.
                     -0.49411762, -1 + 1 / 127.5], np.float32)
  want = np.array([0, 255, 128, 255, 0, 255, 0, 191, 64, 159, 64, 1], np.uint8)

  def stub(params, key_data, indices, labels):
    del params, key_data
    return jnp.broadcast_to(jnp.asarray(values)[indices % 12][:, None, None, None] + 0 * labels[
        :, None, None, None], (indices.shape[0], 3, 2, 1))

  got = sampling.make_sampler(stub, make_mesh(), batch_size=5)(
      {}, np.zeros(12, np.int32), sampling.seed_key_data(0))
  assert got.shape == (12, 3, 2, 1) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[:, 0, 0, 0], want)
  np.testing.assert_array_equal(got, np.broadcast_to(want[:, None, None, None], got.shape))

  def nan_stub(params, key_data, indices, labels):
    return stub(params, key_data, indices, labels) * jnp.nan

  with pytest.raises(FloatingPointError, match="NaN"):
    sampling.make_sampler(nan_stub, make_mesh(), batch_size=4)(
        {}, np.zeros(3, np.int32), sampling.seed_key_data(0))
  # Training previews opt out: a diverged run's grid is written, the loss check reports it.
  nan_out = sampling.make_sampler(nan_stub, make_mesh(), batch_size=4, require_finite=False)(
      {}, np.zeros(3, np.int32), sampling.seed_key_data(0))
  assert nan_out.shape == (3, 3, 2, 1)


def test_example_labels():
  np.testing.assert_array_equal(sampling.example_labels(7, (), 3), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(sampling.example_labels(5, (4, 1), 10), [4, 1, 4, 1, 4])
  np.testing.assert_array_equal(sampling.example_labels(3, (), 0), [0, 0, 0])
