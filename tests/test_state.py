"""Tests of jaxdiff.train.state: the learning-rate schedule against its closed form.

The optimizer and EMA updates it builds are checked in closed form through one train step in
test_step.py.
"""

import numpy as np

from jaxdiff.config import OptimizerConfig
from jaxdiff.train import state as state_lib


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
