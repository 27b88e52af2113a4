"""`python -m pretrain.report` on real run directories: PNGs written, non-blank, holding the runs' curves."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest

from pretrain.monitor.report import PANELS, Run, draw, load_run, main
from tests.conftest import MONITOR_ARGS, REPO, child_env, read_metrics, run_train

PYTHON = [sys.executable, "-m", "pretrain.train"]

ALL_PNGS = {f"{p.file}.png" for p in PANELS if not p.file.startswith("moe_")} | {"overview.png"}  # a dense run


@pytest.fixture(scope="session")
def other_run(tmp_path_factory, demo_shards):
    run_dir = tmp_path_factory.mktemp("monitor") / "other"
    run_train(PYTHON, run_dir, demo_shards, "trainer.max_steps=3", "seed=1", *MONITOR_ARGS)
    return run_dir


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.report", *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def assert_pictures(folder, names) -> None:
    assert {p.name for p in folder.glob("*.png")} == names
    for name in names:
        image = matplotlib.image.imread(folder / name)
        assert image.shape[0] > 300 and image.shape[1] > 500, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_report_of_one_run(resumed_run):
    run_dir, _ = resumed_run
    proc = report(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert_pictures(run_dir / "report", ALL_PNGS)
    assert {Path(p).name for p in proc.stdout.split()} == ALL_PNGS  # the paths written, one a line
    assert "moe_" not in proc.stderr  # a dense run: no MoE panel is missing (it was five lines of noise)


def test_report_of_two_runs_draws_both_on_the_same_axes(resumed_run, other_run, tmp_path):
    run_dir, _ = resumed_run
    # in this process, to save the start of two more (matplotlib's import is slow on a loaded machine)
    assert main([str(run_dir), str(other_run), "--out", str(tmp_path / "cmp")]) == 0
    assert_pictures(tmp_path / "cmp", ALL_PNGS)
    # without --out: into the first run's report/compare/
    assert main([str(run_dir), str(other_run)]) == 0
    assert_pictures(run_dir / "report" / "compare", ALL_PNGS)

    runs = [load_run(run_dir, "watched"), load_run(other_run, "other")]
    loss = next(p for p in PANELS if p.key == "loss")
    fig, ax = plt.subplots()
    assert draw(ax, loss, runs, "step")
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"watched", "other"}
    for label, run in (("watched", run_dir), ("other", other_run)):
        expected = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
        assert list(zip(lines[label].get_xdata(), lines[label].get_ydata(), strict=True)) == expected
    plt.close(fig)

    by_t = next(p for p in PANELS if p.key == "loss_by_t/")
    fig, ax = plt.subplots()
    draw(ax, by_t, runs, "tokens")
    styles = {line.get_linestyle() for line in ax.lines if len(line.get_xdata())}
    assert styles == {"-", "--"}  # one line style per run, one colour per t bucket
    plt.close(fig)


def test_report_refuses_a_directory_without_metrics(tmp_path, resumed_run, capsys):
    run_dir, _ = resumed_run
    assert main([str(run_dir), str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nothing' / 'metrics.jsonl'}: not found " \
                                              f"(is {tmp_path / 'nothing'} a run directory?)"
    assert not (tmp_path / "out").exists()


def test_loss_keeps_its_start_in_frame_and_zooms_on_the_rest_in_an_inset():
    steps = range(1, 201)
    run = Run("r", [{"step": s, "loss": 6.0 + 2.3 * 0.9 ** s + 0.01 * (s % 3)} for s in steps])  # 8.3 -> ~6
    loss = next(p for p in PANELS if p.key == "loss")
    fig, ax = plt.subplots()
    draw(ax, loss, [run], "step")
    first, rest = run.records[0]["loss"], [r["loss"] for r in run.records if r["step"] >= 20]
    low, high = ax.get_ylim()
    assert low <= min(rest) and high >= first  # the whole range: the start is not cut off
    (inset,) = ax.child_axes
    low, high = inset.get_ylim()
    assert low <= min(rest) and max(rest) <= high < first - 1  # the inset: the later points on their own scale
    plt.close(fig)


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    # What a full disk or a crash mid-write left: the run's other records still make a report.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"step": s, "tokens": 64 * s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    assert len(load_run(run_dir, "run").records) == 5
    assert f"warning: {run_dir / 'metrics.jsonl'}:6: the last line is not a whole record (torn); skipped" \
        in capsys.readouterr().err
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "lo\n' + json.dumps(records[1]) + "\n")
    with pytest.raises(Exception, match=r"metrics.jsonl:1: not a JSON object"):
        load_run(run_dir, "run")  # not the last line: not a torn write, the file is wrong


def test_few_points_get_markers_and_axes_are_labelled_in_words():
    """An eval_loss evaluated twice is two dots joined, not a bare line; no axis shows a raw metric key."""
    run = Run("r", [{"step": s, "eval/loss": 7.0 - s / 10, "loss_by_t/0.0-0.5": 6.0, "loss": 6.5} for s in (3, 6)])
    for panel in PANELS:
        fig, ax = plt.subplots()
        drawn = draw(ax, panel, [run], "step")
        label = ax.get_ylabel()
        assert label and "_" not in label and label.split(" (")[0] not in {p.key.rstrip("/") for p in PANELS} - {"loss"}
        assert label.startswith(panel.ylabel), panel.file
        if drawn:
            assert all(line.get_marker() == "o" for line in ax.lines if len(line.get_xdata()) == 2), panel.file
        plt.close(fig)
    assert next(p for p in PANELS if p.key == "eval/loss").ylabel == "held-out NELBO (nats/token)"
