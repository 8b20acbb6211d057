"""Faults around a training run, checked without starting one (the end-to-end cases are in test_training.py)."""

from __future__ import annotations

import math

import pytest

from muco_flow.training.train import NonFiniteLossError, check_finite


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_or_gradient_norm_stops_training_naming_the_step(value):
    with pytest.raises(NonFiniteLossError, match=f"training stopped at step 7: the loss is {value}; no checkpoint"):
        check_finite(7, "loss", value)
    with pytest.raises(NonFiniteLossError, match=f"step 3: the gradient norm is {value}"):
        check_finite(3, "gradient norm", value)


def test_finite_values_pass():
    for value in (0.0, 1e30, -2.5):
        check_finite(1, "loss", value)
