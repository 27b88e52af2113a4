"""How much the training signal varies with the mask schedule and the way t is sampled.

    .venv/bin/python bench/variance.py [--seeds 200] [--run-dir outputs/bench/variance-model] [--smoke]

Takes the demo model after training (trains it first, as `make demo` does, when run-dir has no
checkpoint), one fixed held-out batch, and for each (schedule, time sampling) draws the masks with
`--seeds` seeds. For each it reports the standard deviation across seeds of the loss estimate and
of the gradient (the RMS norm of its deviation from the mean gradient), at the same batch, i.e. the
same cost. Prints a table; the last line is one JSON object.

--noise: instead, the noise band (mask.band) and complementary masks (mask.complementary) for LLaDA
(B = L) and a block model's objective (B = 16, one t per block, the same weights), linear schedule,
iid times. A complementary draw costs two sequences: its row is also given at half the seeds' batch
(`per cost`: the std times sqrt(2), what equal compute would show).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.shards import Manifest  # noqa: E402
from data_pipeline.stream import TokenStream  # noqa: E402
from pretrain.checkpoint import store as checkpoint  # noqa: E402
from pretrain.checks import compose_config, resolve_vocab  # noqa: E402
from pretrain.model.transformer import LLaDAModel  # noqa: E402
from pretrain.objective.diffusion import diffusion_loss, forward_process, make_schedule, sample_times  # noqa: E402

TRAIN_ARGS = ["model=tiny", "optim=wsd_short", "trainer.max_steps=300", "trainer.eval_every=0", "trainer.log_every=50"]
CASES = [("linear", "iid"), ("linear", "stratified"), ("linear", "antithetic"), ("cosine", "iid"),
         ("cosine", "stratified"), ("polynomial", "iid"), ("polynomial", "stratified"), ("loglinear", "iid"),
         ("loglinear", "stratified")]


def trained_model(run_dir: Path, train_args: list[str] = TRAIN_ARGS):
    if checkpoint.latest(str(run_dir)) is None:
        print(f"training the demo model into {run_dir} (about 3 minutes on 2 cores)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pretrain.train", *train_args, f"run_dir={run_dir}"], cwd=ROOT,
                       check=True)
    run = compose_config(train_args + [f"run_dir={run_dir}"])
    resolve_vocab(run)  # model.vocab_size=null: the shards' vocabulary, as training took it
    model = LLaDAModel(run.model)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.ckpt_dir(str(run_dir))),
                                                     tag=checkpoint.latest(str(run_dir)))
    model.load_state_dict(state)
    return run, model.eval()


def measure(model, x0, mask_id, run, schedule_name: str, sampling: str, seeds: int) -> dict:
    cfg = run.mask
    cfg.schedule = schedule_name
    cfg.exponent = 2.0 if schedule_name == "polynomial" else cfg.exponent
    schedule = make_schedule(cfg)
    params = [p for p in model.parameters()]
    losses, grad_sum, grad_sq = [], None, 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        t = sample_times(sampling, x0.shape[0], 0, x0.shape[0], cfg.eps, g)
        noisy = forward_process(x0, mask_id, t, schedule, g)
        loss = diffusion_loss(model(noisy.input_ids), x0, noisy, "tokens")
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([gr.flatten() for gr in grads]).double()
        grad_sum = flat if grad_sum is None else grad_sum + flat
        grad_sq += float(flat.square().sum())
        losses.append(loss.item())
    losses_t = torch.tensor(losses, dtype=torch.float64)
    mean_grad = grad_sum / seeds
    # mean over seeds of ||g_s - mean g||^2 = mean ||g_s||^2 - ||mean g||^2
    grad_var = grad_sq / seeds - float(mean_grad.square().sum())
    return {"schedule": schedule_name, "sampling": sampling, "loss_mean": losses_t.mean().item(),
            "loss_std": losses_t.std().item(), "grad_std": max(grad_var, 0.0) ** 0.5,
            "grad_norm": float(mean_grad.norm())}


NOISE_CASES = [("plain", None, False), ("band 0.3-0.8", [0.3, 0.8], False), ("complementary", None, True),
               ("band + complementary", [0.3, 0.8], True)]


def measure_noise(model, x0, mask_id, run, name: str, band, complementary: bool, block: int | None,
                  seeds: int) -> dict:
    from pretrain.objective.block import block_times
    from pretrain.objective.diffusion import model_loss_and_stats
    from pretrain.objective.noise import complement

    cfg, schedule = run.mask, make_schedule(run.mask)
    low, high = (max(cfg.eps, band[0]), band[1]) if band else (cfg.eps, 1.0)
    B, L = x0.shape
    params = list(model.parameters())
    losses, grad_sum, grad_sq = [], None, 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        if block:
            t = block_times("iid", B, 0, B, L // block, low, g, high)
        else:
            t = sample_times("iid", B, 0, B, low, g, high)
        noisy = forward_process(x0, mask_id, t, schedule, g)
        x, batch = complement(noisy, x0, mask_id, schedule, cfg.eps) if complementary else (x0, noisy)
        loss, _ = model_loss_and_stats(model, x, batch, "tokens", block_size=block)
        flat = torch.cat([gr.flatten() for gr in torch.autograd.grad(loss, params)]).double()
        grad_sum = flat if grad_sum is None else grad_sum + flat
        grad_sq += float(flat.square().sum())
        losses.append(loss.item())
    losses_t, mean_grad = torch.tensor(losses, dtype=torch.float64), grad_sum / seeds
    cost = 2 ** 0.5 if complementary else 1.0
    grad_std = max(grad_sq / seeds - float(mean_grad.square().sum()), 0.0) ** 0.5
    return {"objective": f"B={block or L}", "case": name, "loss_mean": losses_t.mean().item(),
            "loss_std": losses_t.std().item(), "grad_std": grad_std, "loss_std_per_cost": losses_t.std().item() * cost,
            "grad_std_per_cost": grad_std * cost}


def noise_table(model, x0, mask_id, run, seeds: int) -> None:
    rows = [measure_noise(model, x0, mask_id, run, name, band, comp, block, seeds)
            for block in (None, 16) for name, band, comp in NOISE_CASES]
    print(f"{'objective':<9} {'case':<21} {'loss mean':>10} {'loss std':>9} {'grad std':>9} {'per cost: loss':>15} "
          f"{'grad':>7}")
    for r in rows:
        print(f"{r['objective']:<9} {r['case']:<21} {r['loss_mean']:>10.4f} {r['loss_std']:>9.4f} "
              f"{r['grad_std']:>9.4f} "
              f"{r['loss_std_per_cost']:>15.4f} {r['grad_std_per_cost']:>7.4f}")
    print(json.dumps({"seeds": seeds, "batch": list(x0.shape), "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="sequences in the fixed batch")
    parser.add_argument("--run-dir", help="default outputs/bench/variance-model (--smoke: variance-smoke)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a 2-step model, 2 seeds, 2 sequences")
    parser.add_argument("--noise", action="store_true", help="the noise band and complementary masks, B = L and 16")
    parser.add_argument("--source", help="with --noise: a finished run's model and held-out windows instead "
                                         "(e.g. bench/block.py's B = L run), mask=linear")
    args = parser.parse_args()
    if args.noise and args.source:
        from pretrain.evaluate import windows
        from pretrain.hf.pretrained import load_model, open_source

        source = open_source(args.source)
        data_dir = source.data_dir if source.data_dir.is_absolute() else ROOT / source.data_dir
        rows = [r for r, _, _ in windows(data_dir, Manifest.load(data_dir), "heldout")][: args.batch]
        x0 = torch.tensor(np.stack(rows).astype(np.int64))
        run = compose_config(["model=tiny", f"model.vocab_size={source.model.vocab_size}"])  # mask=linear's keys
        print(f"model from {args.source}; fixed held-out batch {tuple(x0.shape)}; {args.seeds} seeds")
        return noise_table(load_model(source).train(False), x0, source.mask_id, run, args.seeds)
    torch.manual_seed(0)
    train_args = TRAIN_ARGS
    if args.smoke:
        args.seeds, args.batch = 2, 2
        train_args = [*TRAIN_ARGS, "trainer.max_steps=2", "trainer.seq_len=32", "trainer.eval_every=0"]
    args.run_dir = args.run_dir or f"outputs/bench/variance-{'smoke' if args.smoke else 'model'}"
    run, model = trained_model(ROOT / args.run_dir, train_args)
    manifest = Manifest.load(ROOT / run.data.dir)
    stream = TokenStream(ROOT / run.data.dir, "heldout", args.batch, rank=0, world_size=1, seed=0, shuffle_buffer=1)
    x0 = next(iter(stream))["tokens"].long()
    print(f"model {run.model.name} from {args.run_dir}; fixed held-out batch {tuple(x0.shape)}; {args.seeds} seeds")
    if args.noise:
        return noise_table(model, x0, manifest.mask_id, run, args.seeds)
    rows = []
    for schedule_name, sampling in CASES:
        start = time.perf_counter()
        rows.append(measure(model, x0, manifest.mask_id, run, schedule_name, sampling, args.seeds))
        rows[-1]["seconds"] = time.perf_counter() - start
    print(f"{'schedule':<11} {'sampling':<11} {'loss mean':>10} {'loss std':>9} {'grad std':>9} {'|mean grad|':>11}")
    for r in rows:
        print(f"{r['schedule']:<11} {r['sampling']:<11} {r['loss_mean']:>10.4f} {r['loss_std']:>9.4f} "
              f"{r['grad_std']:>9.4f} {r['grad_norm']:>11.4f}")
    by = {(r["schedule"], r["sampling"]): r for r in rows}
    iid, strat = by[("linear", "iid")], by[("linear", "stratified")]
    result = {"loss_std_iid": iid["loss_std"], "loss_std_stratified": strat["loss_std"],
              "grad_std_iid": iid["grad_std"], "grad_std_stratified": strat["grad_std"],
              "variance_ratio": (iid["loss_std"] / strat["loss_std"]) ** 2,
              "grad_variance_ratio": (iid["grad_std"] / strat["grad_std"]) ** 2,
              "seeds": args.seeds, "batch": list(x0.shape)}
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
