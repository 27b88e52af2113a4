"""One GPU, end to end: tokens/s, MFU and peak memory of the paper's shapes through the real engine.

    python bench/gpu.py            # on a CUDA machine (needs ~4 minutes)
    python bench/gpu.py --dry      # on a CPU: the same code paths with the tiny model at seq 64
    python bench/gpu.py --smoke    # seconds: --dry, its first case only
    python bench/gpu.py --only llada_1b --profile [--trace-dir DIR]   # where a step's time goes

Cases (seq 4096, micro batch 4, 2 accumulation steps, bf16, compiled blocks, torch fused AdamW):
  llada_1b            pretrain.train's engine: ZeRO-3, optimizer, demo data
  llada_8b_l8[_ckpt]  llada_8b with 8 layers (2.78B parameters, so the optimizer state fits one card),
                      without and with activation checkpointing
  llada_8b_fit        the whole llada_8b, forward + backward only (8B of optimizer state would not fit
                      one card), micro batch 4, checkpointing: the activations the 8-GPU run needs
  llada_1b_eager      llada_1b without torch.compile (what compile buys)
  llada_1b_mb8        llada_1b at micro batch 8
  llada_1b_accum8     llada_1b at cluster=gpu_single's own batch (32 sequences: 8 accumulation steps,
                      the optimizer step amortized as in a real run; the paper's 8-GPU shape has 40)
  llada_1b_fwdbwd     the bare llada_1b, forward + backward only: the model's ceiling without the engine
  llada_1b_persist    llada_1b with every parameter persistent (no ZeRO-3 gather/release on one GPU)
--profile: each engine case also runs torch.profiler over two steps after the warm-up and prints
where the time goes (bench/gpu_profile.py); its tokens/s then carry the profiler's overhead.
Each case runs in its own process (clean peak-memory counter, no leftovers); a case that fails
prints its last error line and the others still run. Cases start only while the time budget lasts.
MFU = tokens/s x FLOPs per token (pretrain/model/flops.py) / the card's dense bf16 peak.
The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPU_ENGINE = ["cluster=gpu_single", "trainer.seq_len=4096", "trainer.micro_batch_size=4",
              "trainer.global_batch_size=8", "trainer.max_steps=8", "trainer.log_every=1", "optim=wsd_short",
              "logging.mode=disabled", "resume=never", "data.num_workers=2",
              "mask.random_length_prob=0"]  # a random cut would recompile mid-measurement
DRY_ENGINE = ["cluster=local_cpu", "model=tiny", "trainer.seq_len=64", "trainer.micro_batch_size=4",
              "trainer.global_batch_size=8", "trainer.max_steps=6", "trainer.log_every=1", "optim=wsd_short",
              "logging.mode=disabled", "resume=never"]
L8 = ["model=llada_8b", "model.n_layers=8"]
CASES = {  # name: (kind, overrides on top of the engine's); run in this order while the budget lasts
    "llada_1b": ("engine", ["model=llada_1b"]),
    "llada_8b_l8_ckpt": ("engine", L8 + ["trainer.activation_checkpointing=full"]),
    "llada_8b_fit": ("model", ["model=llada_8b", "trainer.activation_checkpointing=full"]),
    "llada_8b_l8": ("engine", L8),
    "llada_1b_eager": ("engine", ["model=llada_1b", "trainer.compile=false"]),
    "llada_1b_mb8": ("engine", ["model=llada_1b", "trainer.micro_batch_size=8", "trainer.global_batch_size=16"]),
    "numerics": ("numerics", ["model=llada_1b", "model.n_layers=2", "trainer.seq_len=1024"]),
    "llada_1b_accum8": ("engine", ["model=llada_1b", "trainer.global_batch_size=32", "trainer.max_steps=7"]),
    "llada_1b_fwdbwd": ("model", ["model=llada_1b"]),
    "llada_1b_persist": ("engine", ["model=llada_1b",
                                    "deepspeed.zero_optimization.stage3_param_persistence_threshold=10000000000"]),
}
DRY_CASES = {
    "tiny": ("engine", []),
    "tiny_ckpt": ("engine", ["trainer.activation_checkpointing=full"]),
    "tiny_fit": ("model", ["trainer.activation_checkpointing=full"]),
    "numerics": ("numerics", ["model.mlp_hidden_size=330"]),
}
WARMUP_STEPS = 3  # compile and allocator warm-up: excluded from tokens/s


def configured(overrides: list[str]):
    """The run's config as pretrain.train resolves it (model.vocab_size=null: the shards' vocabulary)."""
    from pretrain.checks import compose_config, resolve_vocab

    run = compose_config(overrides)
    resolve_vocab(run)
    return run


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_engine_case(overrides: list[str], run_dir: Path, profiler=None) -> dict:
    """pretrain.train's own train(), then tokens/s from its metrics.jsonl."""
    from data_pipeline.config import compose
    from pretrain.train import train

    if profiler:
        profiler.install()
        with profiler.prof:
            train(compose(overrides + [f"run_dir={run_dir}"]))
    else:
        train(compose(overrides + [f"run_dir={run_dir}"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > WARMUP_STEPS]
    result = {"tokens_per_s": statistics.median(rates), "steps_timed": len(rates),
              "loss_last": [r["loss"] for r in records if "loss" in r][-1]}
    if profiler:
        result.update(profiled=True, profile=profiler.summary())
    return result


def run_model_case(overrides: list[str]) -> dict:
    """The bare model (no optimizer), forward + backward of the training loss, as many steps as the engine case."""
    from pretrain.model.transformer import LLaDAModel, compile_blocks
    from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

    run = configured(overrides)
    t = run.trainer
    device = torch.device(run.cluster.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[t.precision]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: an fp32 8B model would not fit beside its copy
    with device:
        model = LLaDAModel(run.model)
    torch.set_default_dtype(default)
    model.set_activation_checkpointing(t.activation_checkpointing)
    if t.compile:
        compile_blocks(model)
    gen = torch.Generator().manual_seed(0)
    B, L = t.micro_batch_size, t.seq_len
    rates = []
    for step in range(WARMUP_STEPS + 4):
        x0 = torch.randint(0, run.model.vocab_size - 1, (B, L), generator=gen).to(device)
        t_mask = torch.rand(B, generator=gen)
        noisy = forward_process(x0, run.model.vocab_size - 1, t_mask, make_schedule(run.mask), gen)
        sync()
        start = time.perf_counter()
        loss, _ = model_loss_and_stats(model, x0, noisy)
        loss.backward()
        sync()
        if step >= WARMUP_STEPS:
            rates.append(B * L / (time.perf_counter() - start))
        model.zero_grad(set_to_none=True)
    # Weights and their gradients stay whole here; under ZeRO-3 on N GPUs each rank holds 1/N of
    # them (plus 1/N of the fp32 optimizer state), so peak - this is what activations take.
    weights_grads = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    return {"tokens_per_s": statistics.median(rates), "steps_timed": len(rates), "loss_last": loss.item(),
            "weights_grads_gb": weights_grads}


def run_numerics_case(overrides: list[str], backend: str) -> dict:
    """bf16 on the device: the training path (masked-only head, padded FFN, compiled blocks) against
    the plain formula (full logits, then cross-entropy of the masked rows); relative differences."""
    from pretrain.model.transformer import LLaDAModel, compile_blocks

    run = configured(overrides)
    device, dtype = torch.device(run.cluster.device), torch.bfloat16
    torch.manual_seed(0)
    with device:
        ref = LLaDAModel(run.model).to(dtype)
        fast = LLaDAModel(run.model).to(dtype)
    fast.load_state_dict(ref.state_dict())
    compile_blocks(fast, backend=backend)
    B, L, V = 2, run.trainer.seq_len, run.model.vocab_size
    x0 = torch.randint(0, V - 1, (B, L), device=device)
    masked = torch.rand(B, L, device=device) < 0.5
    ids = x0.masked_fill(masked, V - 1)
    loss_ref = torch.nn.functional.cross_entropy(ref(ids)[masked].float(), x0[masked], reduction="sum")
    loss_ref.backward()
    ce, _ = fast(ids, targets=x0, masked=masked)
    ce.sum().backward()
    rel = [((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
           for p, q in zip(fast.parameters(), ref.parameters(), strict=True)]
    return {"loss_ref": loss_ref.item(), "loss_rel_diff": abs(ce.sum().item() - loss_ref.item()) / loss_ref.item(),
            "grad_rel_diff_max": max(rel), "grad_rel_diff_median": statistics.median(rel)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(name: str, dry: bool, out: Path, profile: bool, trace_dir: Path | None) -> None:
    kind, overrides = (DRY_CASES if dry else CASES)[name]
    overrides = (DRY_ENGINE if dry else GPU_ENGINE) + overrides
    profiler = None
    if profile and kind == "engine":
        from bench.gpu_profile import StepProfiler

        profiler = StepProfiler(skip=WARMUP_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"engine": lambda: run_engine_case(overrides, Path(tmp) / "run", profiler),
                  "model": lambda: run_model_case(overrides),
                  "numerics": lambda: run_numerics_case(overrides, "aot_eager" if dry else "inductor")}[kind]()
    from pretrain.model.flops import flops_per_token, matmul_params

    run = configured(overrides)
    result.update(kind=kind, peak_gb=peak_memory_gb(), flops_per_token=flops_per_token(run.model, run.trainer.seq_len),
                  matmul_params=matmul_params(run.model), micro_batch=run.trainer.micro_batch_size,
                  checkpointing=run.trainer.activation_checkpointing, compile=run.trainer.compile)
    if profiler and trace_dir:
        result["trace"] = str(profiler.write_trace(trace_dir, name))
    out.write_text(json.dumps(result))


def parent(dry: bool, budget_s: float, case_timeout_s: float, only: list[str] | None, extra: list[str]) -> None:
    from bench.gpu_profile import print_summary
    from pretrain.model.flops import mfu, peak_tflops

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(device)
    print(f"device: {device} | torch {torch.__version__} | peak bf16 {peak} TFLOP/s | "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB" if torch.cuda.is_available()
          else f"device: cpu | torch {torch.__version__} (dry run: tiny shapes, no MFU)", flush=True)
    cases = [c for c in (DRY_CASES if dry else CASES) if not only or c in only]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start, results = time.perf_counter(), {}
    for name in cases:
        left = budget_s - (time.perf_counter() - start)
        if left < 30:
            results[name] = {"error": "skipped: time budget spent"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--case", name, "--out", str(out)] + (["--dry"] if dry else []) + extra
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=min(case_timeout_s, left))
                if out.is_file():
                    results[name] = json.loads(out.read_text())
                else:
                    lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
                    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
                    results[name] = {"error": (errors or lines)[-1][:300]}
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"timed out after {min(case_timeout_s, left):.0f} s"}
            results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        r = results[name]
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak)
        print(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'profile'})}", flush=True)
        if "profile" in r:
            print_summary(name, r["profile"])

    print(f"\n{'case':<18} {'kind':<7} {'ckpt':<5} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8} {'wall s':>7}")
    for name, r in results.items():
        if "tokens_per_s" not in r:
            print(f"{name:<18} {r.get('error') or json.dumps(r)}")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        gb = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
        print(f"{name:<18} {r['kind']:<7} {r['checkpointing']:<5} {r['tokens_per_s']:>10,.0f} {m:>6} {gb:>8} "
              f"{r['wall_s']:>7}")
    brief = {name: {k: v for k, v in r.items() if k != "profile"} for name, r in results.items()}  # printed above
    print(json.dumps({"bench": "gpu", "device": device, "torch": torch.__version__, "peak_tflops": peak,
                      "cases": brief}))


def main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny model, seq 64: checks the paths, not the speed")
    p.add_argument("--budget", type=float, default=240.0, help="seconds; no case starts with under 30 s left")
    p.add_argument("--case-timeout", type=float, default=150.0)
    p.add_argument("--only", nargs="*", help="run only these cases")
    p.add_argument("--profile", action="store_true", help="also profile two steps of each engine case")
    p.add_argument("--trace-dir", type=Path, help="with --profile: write each case's Chrome trace (gzip) here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="seconds: --dry with the first case only")
    a = p.parse_args(argv)
    if a.smoke:
        a.dry, a.only = True, a.only or [next(iter(DRY_CASES))]
    if a.case:
        child(a.case, a.dry, a.out, a.profile, a.trace_dir)
    else:
        extra = ["--profile"] if a.profile else []
        extra += ["--trace-dir", str(a.trace_dir.resolve())] if a.trace_dir else []
        parent(a.dry, a.budget, a.case_timeout, a.only, extra)


if __name__ == "__main__":
    main(sys.argv[1:])
