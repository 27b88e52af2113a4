"""Run on 2 ranks by tests/pretrain/engine/test_sequence_parallel.py (torchrun): the tiny model's loss and
gradients over whole sequences against the same under sequence parallelism 2 (DeepSpeed's
DistributedAttention over gloo), for plain, packed (document mask), block diffusion and both; fp32.
Rank 0 prints one JSON line: per case, both losses, the largest gradient difference and the largest
gradient, and the length of the hidden states each rank computed; for the block cases also the split loss
through FlexAttention (forward only: its backward needs a GPU)."""

import json
import sys

import torch
import torch.distributed as dist

from pretrain.checks import compose_config
from pretrain.engine import sequence_parallel as sp
from pretrain.engine.build import init_distributed
from pretrain.model.block_attention import FlexBlockAttention
from pretrain.model.transformer import LLaDAModel
from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

rank, world = init_distributed(120, shm_comm=False)
normalize = sys.argv[1] if len(sys.argv) > 1 else "tokens"
run = compose_config(["model=tiny", "model.vocab_size=256", "trainer.seq_len=64", "cluster.sequence_parallel=2",
                      "trainer.micro_batch_size=2", "trainer.global_batch_size=2", f"mask.normalize={normalize}"],
                     world_size=world)
sp.init_groups(2)
torch.manual_seed(0)  # the same weights on both ranks
model = LLaDAModel(run.model).float()
shard = sp.make_shard(model, sp.Layout.of(run, rank, world))
g = torch.Generator().manual_seed(1)  # the same batch on both ranks: they are one sequence-parallel group
B, L = 3, 64
x0 = torch.randint(0, 250, (B, L), generator=g)
doc_start = torch.rand(B, L, generator=g) < 0.08  # several documents per row, starting anywhere
noisy = forward_process(x0, 255, torch.tensor([0.2, 0.5, 0.9]), make_schedule(run.mask), generator=g)
cases = {"plain": {}, "packed": {"doc_start": doc_start}, "block": {"block_size": 8},
         "block_packed": {"doc_start": doc_start, "block_size": 16}}
out = {}
for name, kwargs in cases.items():
    model.zero_grad()
    whole, _ = model_loss_and_stats(model, x0, noisy, normalize, **kwargs)
    whole.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    part, stats = model_loss_and_stats(model, x0, noisy, normalize, shard=shard, **kwargs)
    part.backward()
    got = [p.grad.clone() for p in model.parameters()]
    for grad in got:  # the group's gradient: the sum of the slices' (ZeRO-3 sums them, tests the engine's scale)
        dist.all_reduce(grad, group=shard.group)
    total, summed = sp.add_up(shard, part.detach(), stats)
    with torch.no_grad():
        clean = {"clean_ids": x0, "block_size": kwargs["block_size"]} if "block_size" in kwargs else {}
        hidden = model.hidden(noisy.input_ids, kwargs.get("doc_start"), shard=shard, **clean)
    out[name] = {"whole": whole.item(), "split": total.item(), "part": part.item(),
                 "grad_err": max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)),
                 "grad_max": max(w.abs().max().item() for w in want),
                 "masked": summed.masked.tolist(), "masked_want": noisy.masked.sum(1).float().tolist(),
                 "hidden_len": hidden.shape[1]}
# FlexAttention (what a block model trains with on a GPU), forward only: its backward needs a GPU. Under SP
# its BlockMask is built in the all-to-all's gathered order (GatheredFlexAttention).
model.block_attention = FlexBlockAttention(compiled=False)
flex_shard = sp.make_shard(model, sp.Layout.of(run, rank, world))
assert isinstance(model.block_attention, sp.GatheredFlexAttention)
with torch.no_grad():
    for name in ("block", "block_packed"):
        part, stats = model_loss_and_stats(model, x0, noisy, normalize, shard=flex_shard, **cases[name])
        out[name]["flex_split"] = sp.add_up(flex_shard, part, stats)[0].item()
if rank == 0:
    print(json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
