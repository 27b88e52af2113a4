"""Where one engine step's time goes: torch.profiler over two optimizer steps of pretrain.train.

Used by `bench/gpu.py --only CASE --profile` (the case runs as usual; two steps after the warm-up
are profiled). Prints, per optimizer step:
  - wall time (from one step's end to the next: logging and the stop/save collective included),
    the union of the GPU's kernel intervals (busy) and what is left (idle: the GPU waiting on the
    host, a sync, or data);
  - kernel time by kind (matmul, attention, inductor-fused, NCCL, copies, optimizer, other);
  - host time of the loop's phases (forward + loss, DeepSpeed backward, DeepSpeed step): a phase
    whose host time nears the step's wall time is where the GPU waits (the backward's kernels are
    launched from autograd's own thread, so phases are not split by GPU time);
  - the 12 kernels that take the most time.
On a CPU (bench/gpu.py --dry) only the host phases are there. With `trace_dir`, a Chrome trace
(gzip) is written there too: open it at https://ui.perfetto.dev.
"""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule

KINDS = [  # kernel name (lower case) pattern -> kind; the first match wins
    ("nccl", r"nccl"),
    ("inductor-fused", r"^triton"),  # named after what they fuse, e.g. triton_poi_fused__to_copy_mul_silu_1
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("optimizer", r"adam|multi_tensor"),
    ("copy", r"^memcpy|^memset|copy_kernel|copy_device"),
]
PHASES = ("forward+loss", "ds_backward", "ds_step")


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, name)), "other")


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class StepProfiler:
    """Wraps the loop's phases in record_function ranges and steps the profiler at each optimizer
    step (pretrain.loop.finish_step), profiling `active` steps after `skip` steps."""

    def __init__(self, skip: int, active: int = 2):
        self.active = active
        cuda = torch.cuda.is_available()
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                            schedule=schedule(wait=skip, warmup=1, active=active, repeat=1))
        self.step_times: list[float] = []
        self.steps_seen, self.first_active = 0, skip + 1

    def install(self) -> None:
        import deepspeed

        import pretrain.loop as loop

        finish_step, forward = loop.finish_step, loop.model_loss_and_stats

        def profiled_finish_step(engine):
            skipped = finish_step(engine)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # only at step ends: the step's own syncs are what we look at
            if self.first_active <= self.steps_seen < self.first_active + self.active:
                self.step_times.append(time.perf_counter() - self.last)
            self.steps_seen += 1
            self.prof.step()
            self.last = time.perf_counter()  # after the profiler's own start/stop work
            return skipped

        def ranged(name, fn):
            def call(*args, **kwargs):
                with record_function(name):
                    return fn(*args, **kwargs)
            return call

        self.last = time.perf_counter()
        loop.finish_step = profiled_finish_step
        loop.model_loss_and_stats = ranged("forward+loss", forward)
        cls = deepspeed.DeepSpeedEngine
        cls.backward = ranged("ds_backward", cls.backward)
        cls.step = ranged("ds_step", cls.step)

    def summary(self) -> dict:
        events = self.prof.events()
        steps = max(len(self.step_times), 1)
        wall_ms = 1e3 * sum(self.step_times) / steps
        # GPU events are kernels, copies and, for each record_function range (ProfilerStep#N, the
        # phases, Optimizer.step), a span on the GPU timeline: those are annotations, not work.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        busy_ms = union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3 / steps
        by_kind: dict[str, float] = {}
        by_name: dict[str, float] = {}
        for e in kernels:
            ms = e.time_range.elapsed_us() / 1e3 / steps
            by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + ms
            by_name[e.name] = by_name.get(e.name, 0.0) + ms
        phases = {}
        for name in PHASES:
            ranges = [e for e in events if e.name == name and e.device_type == torch.autograd.DeviceType.CPU]
            phases[name] = {"host_ms": sum(e.time_range.elapsed_us() for e in ranges) / 1e3 / steps,
                            "calls": len(ranges) // steps}
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
        return {"steps": len(self.step_times), "wall_ms": wall_ms, "gpu_busy_ms": busy_ms,
                "gpu_idle_ms": max(wall_ms - busy_ms, 0.0) if kernels else None,
                "kernel_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                "phases": phases, "top_kernels": [{"name": n[:90], "ms": ms} for n, ms in top]}

    def write_trace(self, trace_dir: Path, case: str) -> Path:
        trace_dir.mkdir(parents=True, exist_ok=True)
        plain = trace_dir / f"{case}.trace.json"
        self.prof.export_chrome_trace(str(plain))
        packed = plain.with_suffix(".json.gz")
        with plain.open("rb") as src, gzip.open(packed, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
        return packed


def print_summary(case: str, s: dict) -> None:
    wall = s["wall_ms"] or float("nan")
    print(f"\nprofile of {case}: {s['steps']} optimizer steps, {wall:.1f} ms each (wall)")
    if s["gpu_idle_ms"] is not None:
        print(f"  GPU busy {s['gpu_busy_ms']:.1f} ms ({100 * s['gpu_busy_ms'] / wall:.0f}%), "
              f"idle {s['gpu_idle_ms']:.1f} ms ({100 * s['gpu_idle_ms'] / wall:.0f}%)")
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in s["kernel_ms_by_kind"].items())
        print(f"  kernel time by kind (ms/step): {kinds}")
    print(f"  {'phase':<14} {'calls':>5} {'host ms':>9}")
    for name, p in s["phases"].items():
        print(f"  {name:<14} {p['calls']:>5} {p['host_ms']:>9.1f}")
    for k in s["top_kernels"]:
        print(f"  {k['ms']:>8.2f} ms  {k['name']}")
