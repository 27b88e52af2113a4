import pytest

from pretrain.checks import compose_config
from pretrain.engine.lr_schedule import decay_beyond_end, lr_fraction, step_to_position, warmup_beyond_end


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
    assert step_to_position(10, "fraction", 999, 40) == 0.25


def test_a_schedule_that_warms_up_beyond_the_run_is_flagged():
    paper = compose_config(["optim=wsd"]).optim.schedule.points
    message = warmup_beyond_end(paper, "tokens", 16 * 256, 10)
    assert "at 1.049e+08 tokens" in message and "step 10" in message and "optim=wsd_short" in message
    assert warmup_beyond_end(paper, "tokens", 1280 * 4096, 3000) is None  # the paper's run reaches it
    short = compose_config(["optim=wsd_short"]).optim.schedule.points
    assert warmup_beyond_end(short, "steps", 1, 10) is None  # half-way through its warmup: a real lr
    assert warmup_beyond_end([[0, 0.0], [1000, 1.0]], "steps", 1, 5) is not None  # 0.5% of the peak


@pytest.mark.parametrize("last_step", [40, 200, 3000])
def test_the_short_schedule_fits_a_run_of_any_length(last_step):
    sched = compose_config(["optim=wsd_short", f"trainer.max_steps={last_step}"]).optim.schedule
    assert sched.unit == "fraction"

    def lr_at(step):
        return lr_fraction(sched.points, step_to_position(step, sched.unit, 4096, last_step))

    assert lr_at(0) == 0.0
    assert lr_at(last_step // 2) == 1.0  # warmed up, holding
    assert lr_at(last_step) == pytest.approx(0.1)  # decayed by the end
    assert warmup_beyond_end(sched.points, sched.unit, 4096, last_step) is None
    assert decay_beyond_end(sched.points, sched.unit, 4096, last_step) is None


def test_a_run_that_ends_before_the_decay_is_flagged():
    in_steps = [[0, 0.0], [20, 1.0], [200, 1.0], [300, 0.1]]  # wsd_short before it counted in fractions
    message = decay_beyond_end(in_steps, "steps", 1, 200)
    assert "start their decay at 200 steps" in message and "step 200" in message and "unit=fraction" in message
    assert decay_beyond_end(in_steps, "steps", 1, 250) is None
    assert decay_beyond_end([[0, 0.0], [20, 1.0]], "steps", 1, 10) is None  # no decay to miss
    paper = compose_config(["optim=wsd"]).optim.schedule.points
    assert "decay at 1.2e+12 tokens" in decay_beyond_end(paper, "tokens", 1280 * 4096, 3000)
