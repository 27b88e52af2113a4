import pytest

from pretrain.checks import compose_config
from pretrain.engine.lr_schedule import lr_fraction, step_to_position, warmup_beyond_end


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


def test_a_schedule_that_warms_up_beyond_the_run_is_flagged():
    paper = compose_config(["optim=wsd"]).optim.schedule.points
    message = warmup_beyond_end(paper, "tokens", 16 * 256, 10)
    assert "at 1.049e+08 tokens" in message and "step 10" in message and "optim=wsd_short" in message
    assert warmup_beyond_end(paper, "tokens", 1280 * 4096, 3000) is None  # the paper's run reaches it
    short = compose_config(["optim=wsd_short"]).optim.schedule.points
    assert warmup_beyond_end(short, "steps", 1, 10) is None  # half-way through its warmup: a real lr
    assert warmup_beyond_end([[0, 0.0], [1000, 1.0]], "steps", 1, 5) is not None  # 0.5% of the peak
