"""Pictures of runs without W&B: `python -m pretrain.report RUN_DIR [RUN_DIR ...] [--out DIR] [--x tokens]`.

Reads each run's metrics.jsonl and writes one PNG per metric (and overview.png, all of them on one
page). One run: into RUN_DIR/report/. Several runs: their curves on the same axes (one colour per
run), into FIRST_RUN_DIR/report/compare/ unless --out says where.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402


@dataclass
class Panel:
    file: str  # <file>.png
    title: str
    key: str  # metrics.jsonl key, or a prefix ending in "/" for one curve per bucket
    log_y: bool = False
    percent: bool = False
    focus: bool = False  # the whole range, and an inset zoomed on the points after the first tenth of the run
    bucket: str = "t "  # a prefix panel's legend: this, then the key's suffix
    ylabel: str = ""  # the axis in words (the key is in the title's file name and in metrics.jsonl)


PANELS = (
    Panel("loss", "training loss", "loss", focus=True, ylabel="loss (nats/token)"),
    Panel("eval_loss", "held-out loss (negative ELBO per token)", "eval/loss", ylabel="held-out NELBO (nats/token)"),
    Panel("loss_by_t", "training loss by masking time t", "loss_by_t/", focus=True, ylabel="loss (nats/token)"),
    Panel("ce_by_t", "cross-entropy per masked token by masking time t", "ce_by_t/", focus=True,
          ylabel="cross-entropy (nats/masked token)"),
    Panel("masked_acc", "masked-token accuracy", "masked_acc", percent=True, ylabel="accuracy"),
    Panel("lr", "learning rate", "lr", ylabel="learning rate"),
    Panel("grad_norm", "gradient norm (before clipping)", "grad_norm", log_y=True, ylabel="gradient norm"),
    Panel("tokens_per_s", "throughput, tokens/s (all devices)", "tokens_per_s", ylabel="tokens/s"),
    Panel("mfu", "model FLOPs utilization", "mfu", percent=True, ylabel="MFU"),
    Panel("moe_load", "expert load per layer: tokens per expert, max / mean", "moe_load/", bucket="layer ",
          ylabel="max / mean tokens per expert"),
    Panel("moe_idle", "share of experts idle in the window, per layer", "moe_idle/", bucket="layer ",
          ylabel="share of experts idle"),
    Panel("moe_bias", "expert bias range (max - min), per layer", "moe_bias/", bucket="layer ",
          ylabel="expert bias range"),
    Panel("moe_loss", "router auxiliary + z-loss", "moe_loss", ylabel="router loss"),
)
FEW_POINTS = 12  # a series shorter than this is drawn with a marker at each point (2 evaluations: 2 dots)
LINE_STYLES = ("-", "--", ":", "-.")


class ReportError(ValueError):
    pass


@dataclass
class Run:
    label: str
    records: list[dict]

    def series(self, key: str, x: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.records if r.get(key) is not None and x in r]
        return [r[x] for r in rows], [r[key] for r in rows]

    def bucket_keys(self, prefix: str) -> list[str]:
        keys = {k for r in self.records for k in r if k.startswith(prefix)}
        return sorted(keys, key=lambda k: float(k[len(prefix):].split("-")[0]))


def load_run(run_dir: Path, label: str) -> Run:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: not found (is {run_dir} a run directory?)")
    records = []
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # torn by a crash or a full disk mid-write: the run's other records stand
                print(f"warning: {path}:{n}: the last line is not a whole record (torn); skipped", file=sys.stderr)
                continue
            raise ReportError(f"{path}:{n}: not a JSON object") from None
    tokens_per_step = next((r["tokens"] / r["step"] for r in records if r.get("tokens") and r["step"]), None)
    for r in records:  # eval records carry only the step; place them on the tokens axis too
        if "tokens" not in r and tokens_per_step is not None:
            r["tokens"] = r["step"] * tokens_per_step
    return Run(label, records)


def labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or whole paths where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def draw(ax, panel: Panel, runs: list[Run], x: str) -> bool:
    """Draws the panel's curves; False when no run has the metric."""
    drawn = False
    for i, run in enumerate(runs):
        if panel.key.endswith("/"):
            keys = run.bucket_keys(panel.key)
            colors = plt.cm.viridis([j / max(len(keys) - 1, 1) for j in range(len(keys))])
            for key, color in zip(keys, colors, strict=True):
                xs, ys = run.series(key, x)
                bucket = panel.bucket + key[len(panel.key):]
                style = LINE_STYLES[i % len(LINE_STYLES)]
                ax.plot(xs, ys, style, marker="o" if len(xs) < FEW_POINTS else None, color=color, lw=1.2, ms=3,
                        label=bucket if i == 0 else None)
                drawn = True
        else:
            xs, ys = run.series(panel.key, x)
            if xs:
                ys = [100 * y for y in ys] if panel.percent else ys
                ax.plot(xs, ys, "-o" if len(xs) < FEW_POINTS else "-", color=f"C{i}", lw=1.5, ms=4, label=run.label)
                drawn = True
    if panel.key.endswith("/") and len(runs) > 1:  # colour: the bucket; line style: the run
        for i, run in enumerate(runs):
            ax.plot([], [], LINE_STYLES[i % len(LINE_STYLES)], color="gray", label=run.label)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
    ax.set_ylabel(f"{panel.ylabel}{' (%)' if panel.percent else ''}")
    if panel.log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 10 rather than 5x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if drawn and (len(runs) > 1 or panel.key.endswith("/")):
        ax.legend(fontsize=7, ncol=2 if panel.key.endswith("/") else 1, loc="lower left")
    if panel.focus:
        zoom_inset(ax)
    return drawn


def zoom_inset(ax) -> None:
    """The main axes keep the whole range (the first losses, 8.3 at ln 4096, are part of the story); an
    inset shows the points past the first tenth of the x range on their own scale, when there are
    enough of them and they span less than half the whole: there a scale set by the start would
    flatten the rest of the run."""
    lines = [line for line in ax.lines if len(line.get_xdata())]
    if not lines:
        return
    x_max = max(max(line.get_xdata()) for line in lines)
    later = [y for line in lines for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if x >= x_max / 10]
    everything = [y for line in lines for y in line.get_ydata()]
    if len(later) < 5 * len(lines) or max(later) - min(later) >= 0.5 * (max(everything) - min(everything)):
        return
    inset = ax.inset_axes([0.5, 0.42, 0.47, 0.5])
    for line in lines:
        inset.plot(line.get_xdata(), line.get_ydata(), line.get_linestyle(), color=line.get_color(), lw=1)
    low, high = min(later), max(later)
    margin = 0.08 * (high - low) or 0.1
    inset.set_xlim(x_max / 10, x_max)
    inset.set_ylim(low - margin, high + margin)
    inset.tick_params(labelsize=7)
    inset.set_title("after the first tenth", fontsize=7)
    inset.grid(True, alpha=0.3)


def write_report(run_dirs: list[Path], out: Path | None = None, x: str = "step") -> list[Path]:
    # Every run is read before anything is drawn: a bad RUN_DIR fails with nothing written.
    runs = [load_run(d, label) for d, label in zip(run_dirs, labels(run_dirs), strict=True)]
    out = out or (run_dirs[0] / "report" if len(run_dirs) == 1 else run_dirs[0] / "report" / "compare")
    out.mkdir(parents=True, exist_ok=True)
    written, present = [], []
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if draw(ax, panel, runs, x):
            fig.tight_layout()
            fig.savefig(out / f"{panel.file}.png", dpi=110)
            written.append(out / f"{panel.file}.png")
            present.append(panel)
        plt.close(fig)
    if present:
        cols = 3
        rows = (len(present) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, present, strict=False):
            draw(ax, panel, runs, x)
        for ax in list(axes.flat)[len(present):]:
            ax.set_visible(False)
        fig.suptitle(" vs ".join(r.label for r in runs))
        fig.tight_layout()
        fig.savefig(out / "overview.png", dpi=90)
        plt.close(fig)
        written.append(out / "overview.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the PNGs go (default: RUN_DIR/report, or FIRST_RUN_DIR/report/compare)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="the horizontal axis")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dirs, args.out, args.x)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    drawn = {p.name for p in written}
    moe = any(name.startswith("moe_") for name in drawn)  # a dense run: the MoE panels are not missing, just moot
    for panel in PANELS:
        if f"{panel.file}.png" not in drawn and (moe or not panel.file.startswith("moe_")):
            hint = " (a CPU run logs it only with cluster.peak_tflops set)" if panel.key == "mfu" else ""
            print(f"{panel.file}.png not drawn: no run has {panel.key.rstrip('/')} in metrics.jsonl{hint}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m pretrain.report is the documented name
    sys.exit(main())
