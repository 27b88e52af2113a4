"""Block diffusion through the real entry point: 2 ranks, ZeRO-3, a block-size schedule, resumed."""

import yaml

from tests.conftest import read_metrics, train_losses


def test_a_resume_across_a_block_size_change_gives_the_uninterrupted_losses(block_run):
    straight, resumed, stdout = block_run
    assert "at step 2" in stdout
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    for step in (3, 4):
        assert abs(b[step] - a[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_the_step_line_and_metrics_show_the_block_size(block_run):
    straight, _, stdout = block_run
    sizes = {r["step"]: r["block_size"] for r in read_metrics(straight) if "loss" in r}
    assert sizes == {1: 4, 2: 4, 3: 16, 4: 16}
    assert "block 16" in stdout
    assert yaml.safe_load((straight / "config.yaml").read_text())["block"]["schedule"]["points"] == [[0, 4], [2, 16]]
