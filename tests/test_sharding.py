"""Tests of jaxdiff.train.sharding: the same toy training steps on 1 device and on 4 devices
(data=4 and data=2 x fsdp=2; and with the flow-matching objective), and which parameter axis
fsdp splits."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff.train import sharding as sharding_lib
from toy_training import FLOW, run_steps, to_numpy


@pytest.mark.parametrize("fsdp", [1, 2])
def test_same_losses_on_one_and_four_devices_with_data_and_fsdp_sharding(toy_reference, fsdp):
  batches, reference_state, reference_losses, _ = toy_reference
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


def test_flow_matching_losses_are_the_same_on_one_and_four_devices(flow_reference):
  batches, _, one, _ = flow_reference
  state, four, _, _ = run_steps(sharding_lib.make_mesh(2), batches, 2, diffusion=FLOW)
  assert len(jax.devices()) == 4 and len(state.step.sharding.device_set) == 4
  np.testing.assert_allclose(four, one, rtol=0, atol=1e-5)
  assert one[0] != one[1]


def test_param_spec_shards_the_largest_divisible_axis():
  assert sharding_lib.param_spec((3, 3, 16, 64), fsdp=4, min_size=1) == P(None, None, None, "fsdp")
  assert sharding_lib.param_spec((64, 6), fsdp=4, min_size=1) == P("fsdp", None)
  assert sharding_lib.param_spec((7, 5), fsdp=4, min_size=1) == P()
  assert sharding_lib.param_spec((64, 64), fsdp=4, min_size=10_000) == P()
  assert sharding_lib.param_spec((64, 64), fsdp=1, min_size=1) == P()
  assert sharding_lib.param_spec((), fsdp=2, min_size=0) == P()
