"""Classifier-free guidance, its interval and CFG rescale, against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import classifier_free_guidance, make_schedule, rescale_guidance, sample


def _model(x, t):
  return jnp.tanh(1.3 * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0)


def _doubled(cond_scale=1.5):
  """First half conditional (1.5 × the model), second half unconditional."""
  def model_fn(x, t):
    half = x.shape[0] // 2
    return jnp.concatenate([cond_scale * _model(x[:half], t[:half]), _model(x[half:], t[half:])])
  return model_fn


def _x(shape=(2, 4, 4, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_convention_and_variance_channels():
  """First half conditional, second half unconditional; variance channels from the first half."""
  calls = []

  def model_fn(x, t):
    calls.append(x.shape[0])
    half = x.shape[0] // 2
    sign = jnp.concatenate([jnp.ones(half), -jnp.ones(half)])[:, None, None, None]
    return jnp.concatenate([_model(x, t) * (1 + sign), 2 + sign * jnp.ones_like(x)], -1)

  x, t = _x(), jnp.array([10, 500])
  out = classifier_free_guidance(model_fn, 3.0, 3)(x, t)
  cond, uncond = 2 * _model(x, t), 0 * _model(x, t)
  np.testing.assert_allclose(out[..., :3], uncond + 3.0 * (cond - uncond), rtol=1e-6)
  np.testing.assert_array_equal(out[..., 3:], 3 * jnp.ones_like(x))
  assert calls == [4]


def test_interval_guides_only_inside():
  x, t = _x(), jnp.array([100.0, 700.0])
  out = classifier_free_guidance(_doubled(), 4.0, 3, interval=(300.0, 800.0))(x, t)
  cond, uncond = 1.5 * _model(x, t), _model(x, t)
  np.testing.assert_allclose(out[0], cond[0], rtol=1e-6)  # t = 100 is outside: conditional.
  np.testing.assert_allclose(out[1], (uncond + 4.0 * (cond - uncond))[1], rtol=1e-6)


def test_rescale_closed_form():
  """φ = 1 gives the guided prediction with the conditional prediction's std, per example."""
  x, t = _x(seed=1), jnp.array([10.0, 900.0])
  cond, uncond = 1.5 * _model(x, t), _model(x, t)
  guided = np.asarray(uncond + 5.0 * (cond - uncond), np.float64)
  out = classifier_free_guidance(_doubled(), 5.0, 3, rescale=0.7)(x, t)
  std = lambda a: a.reshape(2, -1).std(axis=1)[:, None, None, None]
  expected = 0.7 * guided * std(np.asarray(cond)) / std(guided) + 0.3 * guided
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std(np.asarray(rescale_guidance(jnp.asarray(guided), cond, 1.0))),
                             std(np.asarray(cond)), rtol=1e-5)


def test_off_by_default_and_inside_the_scan():
  schedule = make_schedule("linear", 1000)
  kwargs = dict(method="unipc", num_steps=6)
  plain = sample(_doubled(), schedule, _x(), jax.random.key(0), guidance_scale=4.0, **kwargs)
  guided_model = lambda x, t: _model(x, t) + 4.0 * (1.5 * _model(x, t) - _model(x, t))
  np.testing.assert_allclose(plain, sample(guided_model, schedule, _x(), jax.random.key(0),
                                           **kwargs), rtol=1e-5, atol=1e-5)
  everywhere = sample(_doubled(), schedule, _x(), jax.random.key(0), guidance_scale=4.0,
                      guidance_interval=(0.0, 1000.0), **kwargs)
  np.testing.assert_allclose(everywhere, plain, rtol=1e-6)
  nowhere = sample(_doubled(), schedule, _x(), jax.random.key(0), guidance_scale=4.0,
                   guidance_interval=(2000.0, 3000.0), **kwargs)
  conditional = sample(lambda x, t: 1.5 * _model(x, t), schedule, _x(), jax.random.key(0), **kwargs)
  np.testing.assert_allclose(nowhere, conditional, rtol=1e-5, atol=1e-5)
  rescaled = sample(_doubled(), schedule, _x(), jax.random.key(0), guidance_scale=4.0,
                    guidance_rescale=0.7, **kwargs)
  assert not np.allclose(rescaled, plain, rtol=1e-3)
