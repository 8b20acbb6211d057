"""The learning-rate schedules against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from muco_flow.training.schedule import lr_factor


def factors(name: str, warmup: int, total: int, min_ratio: float, steps: range) -> list[float]:
    factor = lr_factor(name, warmup, total, min_ratio)
    return [factor(step) for step in steps]


def test_cosine_warms_up_then_falls_to_its_floor():
    # warmup 2: 1/2, 2/2. Then over total - warmup = 4 steps, 0.1 + 0.9 * (1 + cos(pi * p)) / 2 for
    # p = 0, 1/4, 2/4, 3/4, 1: 1, 0.1 + 0.9 * 0.853553, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.146447, 0.1
    expected = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1, 0.1]
    assert factors("cosine", 2, 6, 0.1, range(9)) == pytest.approx(expected, abs=1e-6)


def test_cosine_floor_is_a_parameter():
    # no floor: (1 + cos(pi * p)) / 2 for p = 0, 1/2, 1 after one warmup step
    assert factors("cosine", 1, 3, 0.0, range(4)) == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_linear_warms_up_then_falls_in_a_straight_line():
    # 1 - 0.9 * p for p = 0, 1/4, 2/4, 3/4, 1
    expected = [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    assert factors("linear", 2, 6, 0.1, range(8)) == pytest.approx(expected)


def test_constant_warms_up_then_holds_the_peak_whatever_the_floor():
    assert factors("constant", 4, 10, 0.1, range(7)) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    assert lr_factor("constant", 4, 10, 0.1)(10_000) == 1.0


def test_no_warmup_starts_at_the_peak():
    assert factors("constant", 0, 5, 0.1, range(2)) == [1.0, 1.0]
    assert factors("linear", 0, 2, 0.0, range(3)) == pytest.approx([1.0, 0.5, 0.0])


def test_an_optimizer_follows_the_factor():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("cosine", 1, 3, 0.0))
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.2, 0.2, 0.1, 0.0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("step", 10, 100, 0.1), "schedule must be one of"),
        (("cosine", -1, 100, 0.1), "warmup steps must be at least 0"),
        (("linear", 10, 100, 1.5), r"minimum ratio must be within \[0, 1\]"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        lr_factor(*args)
