"""The training loop: batches in, optimizer steps out, with logging, eval and checkpoints.

It knows the engine only through forward / backward / step, so the model and the optimizer step
stay in pretrain/model/transformer.py and DeepSpeed. Every rank runs the same number of forward passes and
collectives in the same order: the stream never runs dry, and stopping is decided from the step
count, which all ranks share.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline.stream import TokenStream, make_loader
from pretrain.checkpoint import store as checkpoint
from pretrain.checkpoint.resume_check import config_dict
from pretrain.config import RunConfig, total_steps
from pretrain.engine.expert_balance import ExpertBalance
from pretrain.engine.sequence_parallel import Layout, add_up, make_shard
from pretrain.faults import (
    NonFiniteSteps,
    SampleLog,
    StopRequest,
    Watchdog,
    finish_step,
    inject_loss_fault,
    stop_agreed,
)
from pretrain.model.block_attention import FlexBlockAttention
from pretrain.model.flops import flops_per_token, peak_tflops
from pretrain.model.moe import router_loss
from pretrain.monitor.metrics import MetricsLogger, console_line
from pretrain.monitor.train_stats import LogWindow, device_name
from pretrain.objective.block import block_size_at, block_times, pass_block_size
from pretrain.objective.diffusion import (
    forward_process,
    make_schedule,
    model_loss_and_stats,
    random_length,
    sample_times,
)
from pretrain.objective.likelihood import NelboSums, nelbo_of_batch
from pretrain.objective.noise import complement, keyed_uniforms


def derived_seed(*parts: int | str) -> int:
    """A seed for one purpose at one step, the same on every rank and in every process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def mask_uniforms(seed: int, step: int, first: int, n: int, length: int) -> torch.Tensor:
    """The masking draws of global sequences first..first+n-1 of a step: keyed by (seed, step, global
    index), whatever the ranks and micro-batches (pretrain/objective/noise.py)."""
    return keyed_uniforms([derived_seed("mask", seed, step, first + b) for b in range(n)], length)


@dataclass
class LoopState:
    step: int = 0
    batches: int = 0  # micro-batches this rank has consumed since the run began
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite gradient norm


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (trainer.max_bad_steps)."""


class Trainer:
    def __init__(self, run: RunConfig, engine, train_stream: TokenStream, eval_stream: TokenStream | None,
                 mask_id: int, metrics: MetricsLogger, stop: StopRequest):
        self.run, self.engine, self.metrics = run, engine, metrics
        self.train_stream, self.eval_stream, self.mask_id = train_stream, eval_stream, mask_id
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = engine.device
        t = run.trainer
        # cluster.sequence_parallel: a group of N ranks shares each sequence; the batch math is per group
        self.layout = Layout.of(run, self.rank, self.world)
        self.shard = make_shard(engine.module, self.layout)  # None: whole sequences (N = 1)
        self.accum = t.global_batch_size // (t.micro_batch_size * self.layout.dp_size)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.state = LoopState()
        self.batches_this_process = 0  # what the train stream's state counts from
        self.schedule = make_schedule(run.mask)
        self.save_clock = checkpoint.SaveClock(t.ckpt_every_minutes)
        self.saved_step: int | None = None  # the step of this process's last complete checkpoint
        self.stop = stop
        self.watchdog = Watchdog(t.watchdog_s)
        self.bad_steps = NonFiniteSteps(t.max_bad_steps)
        self.total_steps = total_steps(t)
        self.window = LogWindow(run.logging.t_buckets, self.device)  # what the next log line reports
        self.sparse_attention = isinstance(engine.module.block_attention, FlexBlockAttention)
        if run.block.embedding_noise > 0:
            engine.module.embedding_noise = (run.block.embedding_noise, mask_id)
        self.peak_tflops = peak_tflops(device_name(self.device), run.cluster.peak_tflops)
        self.experts = ExpertBalance(engine.module, self.device)  # model.moe: bias update and load metrics

    # -- state -------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.state.step, "batches": self.state.batches, "skipped_steps": self.state.skipped_steps,
                "tokens": self.state.step * self.tokens_per_step, "world_size": self.world,
                "data": self.train_stream.state_dict(self.batches_this_process),
                "torch_rng": checkpoint.encode_bytes(torch.get_rng_state())}

    def load_trainer_state(self, saved: dict) -> None:
        """A saved state from this rank, or, at another world size, rank 0's without its RNG states
        (checkpoint.load). The masks need no state: they are keyed by step and sequence (micro_step);
        a `mask_rng` in older checkpoints is ignored."""
        self.train_stream.load_state_dict(saved["data"])
        if "torch_rng" in saved:
            torch.set_rng_state(checkpoint.decode_bytes(saved["torch_rng"]))
        self.state = LoopState(step=saved["step"], batches=saved["batches"],
                               skipped_steps=saved.get("skipped_steps", 0))
        self.saved_step = saved["step"]

    def done(self) -> bool:
        t = self.run.trainer
        return ((t.max_steps is not None and self.state.step >= t.max_steps)
                or (t.max_tokens is not None and self.state.step * self.tokens_per_step >= t.max_tokens))

    # -- steps -------------------------------------------------------------------------------
    def prompt_len(self, batch: dict) -> torch.Tensor | None:
        """The conditional form's prompt lengths: from the shards (format=sft) or mask.prompt_len."""
        if not self.run.mask.conditional:
            return None
        if "prompt_len" in batch:
            return batch["prompt_len"]
        return torch.full((batch["tokens"].shape[0],), self.run.mask.prompt_len, dtype=torch.long)

    def doc_start(self, batch: dict, length: int) -> torch.Tensor | None:
        """Where documents begin (model.document_mask=true), cut to the batch's length."""
        return batch["doc_start"][:, :length].to(self.device) if "doc_start" in batch else None

    def block_size(self) -> int:
        """The block size of the step being trained (block.size / block.schedule); seq_len: none."""
        return block_size_at(self.run.block, self.run.trainer.seq_len, self.state.step, self.tokens_per_step,
                             self.total_steps)

    def micro_step(self, batch: dict, micro: int) -> None:
        # Cut and times are drawn from generators seeded by the step, the masks by step and sequence
        # (objective/noise.py): every rank agrees, and another data-parallel layout draws the same.
        m, blk, step = self.run.mask, self.run.block, self.state.step
        self.engine.module.step = step  # the annealed attention mask of this step (model.attention_anneal_steps)
        size = self.block_size()
        blocks = size < self.run.trainer.seq_len
        cut_rng = torch.Generator().manual_seed(derived_seed("cut", self.run.seed, step, micro))
        multiple = math.lcm(size if blocks else 1, self.layout.size)  # whole blocks, split evenly by the group
        x0 = random_length(batch["tokens"].to(self.device).long(), m.random_length_prob, cut_rng, multiple=multiple)
        B, L = x0.shape
        # this micro-batch's first sequence in the global batch (a sequence-parallel group reads the same ones)
        first = (micro * self.layout.dp_size + self.layout.dp_rank) * B
        low, high = (max(m.eps, m.band[0]), m.band[1]) if m.band is not None else (m.eps, 1.0)
        time_rng = torch.Generator().manual_seed(derived_seed("time", self.run.seed, step))
        n_global = self.run.trainer.global_batch_size
        if blocks and blk.noise == "block":
            t = block_times(m.time_sampling, n_global, first, B, L // size, low, time_rng, high)
        else:
            t = sample_times(m.time_sampling, n_global, first, B, low, time_rng, high)
        uniforms = mask_uniforms(self.run.seed, step, first, B, L)
        elbo = blk.weight == "elbo"
        noisy = forward_process(x0, self.mask_id, t, self.schedule, prompt_len=self.prompt_len(batch),
                                uniforms=uniforms, elbo_weight=elbo)
        doc_start = self.doc_start(batch, L)
        if m.complementary:
            x0, noisy = complement(noisy, x0, self.mask_id, self.schedule, m.eps, elbo)
            doc_start = None if doc_start is None else torch.cat([doc_start, doc_start])
        loss, stats = model_loss_and_stats(self.engine, x0, noisy, m.normalize, doc_start,
                                           block_size=pass_block_size(size, L), shard=self.shard)
        loss = inject_loss_fault(loss, self.run.fault, step + 1, self.rank)
        aux = router_loss(self.engine.module)  # model.moe's auxiliary and z-losses (0.0 when off)
        self.experts.add_loss(aux)
        # a sequence-parallel slice's loss is scaled for ZeRO-3's average (SequenceShard.loss_scale)
        self.engine.backward((loss if self.shard is None else loss * self.shard.loss_scale) + aux)
        self.engine.step()  # DeepSpeed applies the update only at the accumulation boundary
        self.window.add(*add_up(self.shard, loss.detach().float(), stats), x0.shape[1])

    def train(self) -> str:
        """Trains until max_steps / max_tokens ("done") or until a rank is asked to stop
        ("preempted"); either way the last step is saved."""
        t = self.run.trainer
        batches = iter(make_loader(self.train_stream))
        self.window.reset()
        self.started = time.perf_counter()
        first_step = self.state.step
        samples = SampleLog(self.run.run_dir, self.rank, first_step) if self.run.fault.record_samples else None
        if stop_agreed(self.stop):  # asked to stop while the engine was built or the checkpoint loaded
            if self.rank == 0:
                print(f"stopping before step {first_step + 1}: {self.stop.reason}", flush=True)
            return "preempted"  # nothing trained since the checkpoint loaded (or since step 0): nothing to save
        self.watchdog.kick()
        while not self.done():
            step_start = time.perf_counter()  # steps are timed alone: eval and checkpoints don't count
            for micro in range(self.accum):
                batch = self.window.next_batch(batches)
                if samples:
                    samples.add(batch)
                self.micro_step(batch, micro)
            skipped = finish_step(self.engine)
            self.experts.end_step()
            self.window.end_step(time.perf_counter() - step_start)
            self.state.step += 1
            self.state.batches += self.accum
            self.state.skipped_steps += skipped
            self.batches_this_process += self.accum
            if samples:
                samples.flush(self.state.step)
            last = self.done()
            if self.state.step % t.log_every == 0 or last or self.state.step == first_step + 1:
                self.log_window(self.state.step - first_step)
                self.window.reset()
            problem = self.bad_steps.record(skipped, self.state.step, self.saved_step)
            if problem:
                raise NonFiniteError(problem)
            if t.eval_every and (self.state.step % t.eval_every == 0 or last):
                self.evaluate()
            if last:
                break
            save_due, stop = self.boundary_flags()
            # No scheduled save in a streak of non-finite steps (every rank skipped the same steps): if
            # it ends in max_bad_steps, the newest checkpoint must be the state before it.
            if (save_due or (t.ckpt_every and self.state.step % t.ckpt_every == 0)) and not self.bad_steps.in_streak:
                self.save()
            self.watchdog.kick()
            if stop:
                if self.rank == 0:
                    print(f"stopping at step {self.state.step}: {self.stop.reason}", flush=True)
                self.save()
                return "preempted"
        self.save()
        return "done"

    def boundary_flags(self) -> tuple[bool, bool]:
        """One collective per step for two decisions every rank must share: a time-based save (rank 0's
        clock decides) and a stop (any rank that was signalled, or lost its launcher, decides)."""
        flags = torch.tensor([float(self.rank == 0 and self.save_clock.due()), float(self.stop.reason is not None)],
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save_due, stop = flags.tolist()
        return bool(save_due), self.stop.agree(bool(stop))

    def stop_agreed_now(self) -> bool:
        """Whether any rank was asked to stop, agreed by all (one small all-reduce)."""
        flag = torch.tensor([float(self.stop.reason is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self.stop.agree(bool(flag.item()))

    def log_window(self, steps_this_process: int) -> None:
        seq_len = self.run.trainer.seq_len
        size = block_size_at(self.run.block, seq_len, self.state.step - 1, self.tokens_per_step,
                             self.total_steps)  # the size the step just trained used
        # MFU: the FLOPs executed at this block size (the 2L pass; pretrain/model/flops.py)
        fpt = flops_per_token(self.run.model, seq_len, size, self.sparse_attention)
        stats = self.window.summarize(self.run.mask.normalize, self.world, fpt, self.peak_tflops,
                                      copies=self.layout.size)
        grad_norm = self.engine.get_global_grad_norm()
        loss_name = "loss/per_token" if self.run.mask.normalize == "tokens" else "loss/per_masked_token"
        record = {"step": self.state.step, "tokens": self.state.step * self.tokens_per_step,
                  loss_name: stats["loss"], **stats, "lr": self.engine.get_lr()[0],
                  "block_size": size if size < self.run.trainer.seq_len else None,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "skipped_steps": self.state.skipped_steps, **self.experts.summary()}
        self.metrics.log(record)
        if self.rank == 0:
            per_step = (time.perf_counter() - self.started) / steps_this_process
            eta = format_duration(per_step * (self.total_steps - self.state.step))
            print(console_line(record, self.total_steps, eta), flush=True)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The held-out negative ELBO per token (pretrain/objective/likelihood.py, the estimator of python -m
        pretrain.evaluate): trainer.eval_mc_num stratified mask draws per sequence from a generator seeded
        the same at every eval, so evals differ only by the model. Every rank runs the same number of
        forward passes. A stop (a signal, a dead launcher) abandons the eval, agreed by the ranks before
        each batch, and returns None: a job-wide SIGTERM is followed by SIGKILL after ~30 s (SLURM's
        KillWait, deepspeed's launch.py), and a long eval would leave no time for the checkpoint."""
        assert self.eval_stream is not None
        self.engine.eval()
        self.engine.module.step = self.state.step
        # seeded by the data-parallel rank: a sequence-parallel group scores its (shared) sequences alike
        rng = torch.Generator().manual_seed(derived_seed("eval", self.run.seed, self.layout.dp_rank))
        # A block model is scored at the size its last step trained with (the block NELBO); none: LLaDA's.
        size = pass_block_size(block_size_at(self.run.block, self.run.trainer.seq_len, self.state.step - 1,
                                             self.tokens_per_step, self.total_steps), self.run.trainer.seq_len)
        sums = NelboSums()
        for batch in itertools.islice(iter(make_loader(self.eval_stream)), self.run.trainer.eval_batches):
            if self.stop_agreed_now():  # the checkpoint first: a stop leaves ~30 s before SIGKILL
                self.engine.train()
                if self.rank == 0:
                    print(f"step {self.state.step:>6} | eval abandoned: {self.stop.reason}", flush=True)
                return None
            x0 = batch["tokens"].to(self.device).long()
            sums.sums += nelbo_of_batch(self.engine, x0, self.mask_id, self.run.trainer.eval_mc_num, rng,
                                        self.prompt_len(batch), batch_size=x0.shape[0],
                                        doc_start=self.doc_start(batch, x0.shape[1]), block_size=size).sums
        totals = sums.sums.to(self.device)
        dist.all_reduce(totals)
        totals /= self.layout.size  # each group's N ranks scored the same sequences the same way
        estimate = NelboSums(totals.cpu()).estimate()
        self.engine.train()
        self.metrics.log({"step": self.state.step, "eval/loss": estimate.nelbo, "eval/loss_se": estimate.se})
        if self.rank == 0:
            print(f"step {self.state.step:>6} | eval loss {estimate.nelbo:.4f} +- {estimate.se:.4f}", flush=True)
        return estimate.nelbo

    def save(self) -> None:
        """A complete checkpoint of this step (all ranks must call it at the same step boundary); a
        second call at the same step does nothing."""
        if self.saved_step == self.state.step:
            return
        t = self.run.trainer
        meta = {"config": config_dict(self.run), "data_fingerprint": self.train_stream.manifest.fingerprint(),
                "tokens": self.state.step * self.tokens_per_step}
        checkpoint.save(self.engine, self.run.run_dir, self.state.step, self.trainer_state(), meta,
                        keep_last=t.keep_last, keep_every=t.keep_every)
        self.saved_step = self.state.step
        self.save_clock.reset()
        self.watchdog.kick()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
