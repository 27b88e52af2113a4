import pytest

from pretrain.config import compose_config
from pretrain.lr_schedule import lr_fraction, step_to_position


def test_paper_schedule_in_tokens():
    points = compose_config(["optim=wsd"]).optim.schedule.points
    lr = 4e-4
    assert lr_fraction(points, 0) == 0.0
    assert lr_fraction(points, 1.048576e10 / 2) * lr == pytest.approx(2e-4)  # mid-warmup
    assert lr_fraction(points, 2000 * 1280 * 4096) * lr == pytest.approx(4e-4)  # warmup ends at 2000 steps
    assert lr_fraction(points, 1.2e12 - 1) * lr == pytest.approx(4e-4)
    assert lr_fraction(points, 1.2e12) * lr == pytest.approx(1e-4)  # the drop at 1.2T
    assert lr_fraction(points, 1.9e12) * lr == pytest.approx(1e-4)
    assert lr_fraction(points, 2.15e12) * lr == pytest.approx(5.5e-5)  # halfway down 1e-4 -> 1e-5
    assert lr_fraction(points, 3e12) * lr == pytest.approx(1e-5)


def test_step_to_position():
    assert step_to_position(10, "steps", 999) == 10
    assert step_to_position(10, "tokens", 1280 * 4096) == 10 * 1280 * 4096
