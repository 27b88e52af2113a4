"""The model on the CPU, fp32: speed against Hugging Face Llama, ZeRO-3 memory per rank, activation memory.

    python bench/model.py              # all three parts (~3 minutes on 2 cores)
    python bench/model.py --part speed|zero|activations
    python bench/model.py --smoke      # seconds: the code paths, not the figures

speed:        forward + backward tokens/s of our model and of transformers' LlamaModel (+ an untied
              head, the same loss) of the same shape with full bidirectional attention, alternated
              in one run; ours trains through the masked-only head (pretrain/model/output_head.py), the
              peer through full logits. Keys ours_tokens_per_s, peer_tokens_per_s, ratio.
zero:         model=small under the real engine (DeepSpeed ZeRO-3, gloo) at 1, 2 and 4 CPU ranks:
              each rank's parameter shards + fp32 master + Adam moments (bytes held by its optimizer
              and partitions) against 16 bytes/param / ranks.
activations:  bytes the autograd graph keeps per block (saved tensors) for one micro-batch, with and
              without activation checkpointing.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.checks import compose_config  # noqa: E402
from pretrain.model.transformer import LLaDAModel  # noqa: E402

SHAPE = ["model=tiny", "model.n_layers=4", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
         "model.mlp_hidden_size=704", "model.vocab_size=8192"]
B, L = 4, 256


def hf_llama(m):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_hidden_size,
                      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                      max_position_embeddings=m.max_sequence_length, rope_theta=m.rope_theta,
                      rms_norm_eps=m.rms_norm_eps, attn_implementation="sdpa")
    body = LlamaModel(cfg)
    for layer in body.layers:
        layer.self_attn.is_causal = False
    head = torch.nn.Linear(m.d_model, m.vocab_size, bias=False)
    return body, head


def peer_loss(body, head, ids, x0, masked):
    # An all-zero additive 4D mask: every position sees every other (bidirectional).
    allow = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    h = body(input_ids=ids, attention_mask=allow).last_hidden_state
    return F.cross_entropy(head(h)[masked].float(), x0[masked])


def check_peer_is_bidirectional(body, head) -> None:
    ids = torch.randint(0, 100, (1, 16))
    other = ids.clone()
    other[0, 12] += 1
    with torch.no_grad():
        allow = torch.zeros(1, 1, 16, 16)
        a = body(input_ids=ids, attention_mask=allow).last_hidden_state
        b = body(input_ids=other, attention_mask=allow).last_hidden_state
    assert (a[0, 2] - b[0, 2]).abs().max() > 1e-5, "the peer model is causal: a later token did not change position 2"


def bench_speed(rounds: int = 6) -> dict:
    torch.manual_seed(0)
    run = compose_config(SHAPE + [f"trainer.seq_len={L}"])
    ours = LLaDAModel(run.model)
    body, head = hf_llama(run.model)
    check_peer_is_bidirectional(body, head)
    x0 = torch.randint(0, run.model.vocab_size - 1, (B, L))
    masked = torch.rand(B, L) < 0.5
    ids = x0.masked_fill(masked, run.model.vocab_size - 1)

    def step_ours():
        ce, _ = ours(ids, targets=x0, masked=masked)
        ce.mean().backward()

    def step_peer():
        peer_loss(body, head, ids, x0, masked).backward()

    times = {"ours": [], "peer": []}
    for r in range(rounds + 1):  # alternated, so machine load hits both alike; round 0 warms up
        for name, fn in (("ours", step_ours), ("peer", step_peer)):
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    ours_tps = B * L / statistics.median(times["ours"])
    peer_tps = B * L / statistics.median(times["peer"])
    print(f"speed (fp32, CPU, {torch.get_num_threads()} threads, B={B} L={L}, d={run.model.d_model}, "
          f"{run.model.n_layers} layers, vocab {run.model.vocab_size}):")
    print(f"  {'ours tokens/s':<22}{ours_tps:>10,.0f}\n  {'HF Llama tokens/s':<22}{peer_tps:>10,.0f}\n"
          f"  {'ratio':<22}{ours_tps / peer_tps:>10.2f}")
    return {"ours_tokens_per_s": ours_tps, "peer_tokens_per_s": peer_tps, "ratio": ours_tps / peer_tps}


ZERO_CHILD = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, @REPO@)
from pretrain.checks import compose_config
from pretrain.engine.build import build_engine, init_distributed, world_size_from_env
world = world_size_from_env()
run = compose_config(["model=@MODEL@", "model.vocab_size=1024", "trainer.seq_len=64", "trainer.micro_batch_size=1",
                      f"trainer.global_batch_size={world}", "trainer.precision=fp32"], world_size=world)
init_distributed(run.cluster.timeout_s, shm_comm=False)
engine = build_engine(run, world)
ids = torch.randint(0, 1000, (1, 64))
ce, _ = engine(ids, targets=ids, masked=torch.ones_like(ids, dtype=torch.bool))
engine.backward(ce.mean())
engine.step()  # the Adam moments exist after the first step
opt = engine.optimizer


def nbytes(tensors):
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


# What this rank holds of the model states, storage counted once: its parameter partitions, the
# optimizer's flat fp32 partitions, their gradient partitions and the Adam moments.
partitions = [p.ds_tensor for p in engine.module.parameters()]
flat = list(opt.fp32_partitioned_groups_flat)
grads = [t.grad for t in flat if t.grad is not None]
moments = [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
state = nbytes(partitions + flat + grads + moments)  # a storage shared by two of these counts once
total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
out = [None] * world
dist.all_gather_object(out, state)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({"world": world, "params": total, "bytes_per_rank": out}))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_zero(worlds=(1, 2, 4), model: str = "small") -> dict:
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "zero_child.py"
        script.write_text(ZERO_CHILD.replace("@REPO@", repr(str(REPO))).replace("@MODEL@", model))
        for w in worlds:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(w), "--master_port",
                   str(free_port()), str(script)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"world {w}: {proc.stderr[-2000:]}")
            r = json.loads(line[0][7:])
            ideal = 16 * r["params"] / w
            results[w] = {"bytes_per_rank_max": max(r["bytes_per_rank"]), "ideal": ideal,
                          "ratio": max(r["bytes_per_rank"]) / ideal}
    print(f"\nZeRO-3 model states per rank, model={model} ({r['params'] / 1e6:.1f}M parameters), fp32 CPU:")
    print(f"  {'ranks':>5} {'MB per rank':>12} {'16 B/param/N':>13} {'ratio':>6}")
    for w, v in results.items():
        print(f"  {w:>5} {v['bytes_per_rank_max'] / 1e6:>12.1f} {v['ideal'] / 1e6:>13.1f} {v['ratio']:>6.3f}")
    return {str(w): v for w, v in results.items()}


def saved_bytes(model, ids, x0, masked) -> int:
    """Bytes of the tensors autograd saves for the backward during one forward (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce, _ = model(ids, targets=x0, masked=masked)
    ce.sum().backward()
    return total


def bench_activations() -> dict:
    torch.manual_seed(0)
    run = compose_config(SHAPE + [f"trainer.seq_len={L}"])
    x0 = torch.randint(0, run.model.vocab_size - 1, (B, L))
    masked = torch.rand(B, L) < 0.5
    ids = x0.masked_fill(masked, run.model.vocab_size - 1)
    out = {}
    for spec in ("none", "full"):
        per = {}
        for n_layers in (2, 4):  # the difference per 2 blocks removes the embedding's and the head's share
            cfg = compose_config(SHAPE + [f"model.n_layers={n_layers}"]).model
            model = LLaDAModel(cfg)
            model.set_activation_checkpointing(spec)
            per[n_layers] = saved_bytes(model, ids, x0, masked)
        out[spec] = (per[4] - per[2]) / 2
    print(f"\nactivation memory per block (B={B}, L={L}, d={run.model.d_model}, fp32; saved for the backward):")
    for spec, v in out.items():
        print(f"  checkpointing={spec:<5} {v / 1e6:8.2f} MB  ({v / (B * L):,.0f} bytes/token)")
    print(f"  ratio none/full {out['none'] / out['full']:.1f}")
    return {"per_block_bytes_none": out["none"], "per_block_bytes_full": out["full"]}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["speed", "zero", "activations"], action="append")
    p.add_argument("--smoke", action="store_true", help="seconds: seq 32, one round, ZeRO-3 of model=tiny on 1 rank")
    args = p.parse_args(argv)
    parts = args.part or ["speed", "activations", "zero"]
    global L
    if args.smoke:  # the code paths, not the figures (tests/bench/test_smoke.py)
        L = 32
    result = {"bench": "model"}
    for part in parts:
        result.update({"speed": lambda: bench_speed(1 if args.smoke else 6),
                       "zero": lambda: {"zero3": bench_zero((1,), "tiny") if args.smoke else bench_zero()},
                       "activations": lambda: {"activations": bench_activations()}}[part]())
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
