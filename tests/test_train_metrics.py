"""Tests of jaxdiff.train.metrics: averaging of step metrics and the non-finite stop."""

import numpy as np
import pytest

from jaxdiff.train import metrics as metrics_lib


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
