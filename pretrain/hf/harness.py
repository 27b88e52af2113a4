"""lm-evaluation-harness's model `llada` (lm-eval 0.4.x): how LLaDA's own repository and the
diffusion-LM papers report benchmark numbers, on a run directory or an exported folder.

- `loglikelihood` (multiple choice, ...): the paper's conditional likelihood -log p(continuation |
  context), estimated as pretrain/objective/likelihood.py does (`mc_num` mask draws on a stratified grid,
  `batch_size` sequences per forward pass), the published estimator's semantics; returned negated, as
  a log-likelihood (a lower bound on it in expectation). The draws of request (doc d, choice j) are
  seeded by (seed, d, j), as `pretrain.evaluate --choices` seeds item d's choice j: the same pairs
  give the same numbers, in any order and on any number of processes. `is_greedy` (lm-eval's `acc`
  for tasks such as lambada) by the published check: from the continuation fully masked, reveal the
  most confident position per step; greedy when every revealed token is the continuation's
  (`check_greedy=false` skips it: it costs a forward per continuation token).
- `loglikelihood_rolling` (perplexity tasks): the NELBO of the document, over lm-eval's disjoint
  windows of the model's length, each conditioned on what precedes it in the window (the first on EOS).
- `generate_until`: the sampler (pretrain/objective/sampler.py), settings from the request's
  gen_kwargs, else the model args: gen_length (else the task's max_gen_toks), steps (default
  gen_length), block_length (default gen_length), cfg, remasking, temperature, threshold, factor, cache
  (none, prefix, dual; docs/fast_sampling.md); the text is cut at EOS and before the first `until`
  string. Requests with the same settings are sampled `batch_size` at a time, left-padded with the
  padding masked out of attention (at temperature 0 a request gets what it gets alone). Each process
  holds the whole model, so processes sample without collectives and need not agree on passes.

Under torchrun each process loads the whole model on its own device and lm-eval deals the documents out
to the processes (rank r takes documents r, r + world_size, ...); results are gathered on rank 0.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from functools import partial

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from pretrain.engine.device import pick_device, pick_dtype
from pretrain.hf.pretrained import CHOICE_MC_NUM, encode_pair, load_model, open_source
from pretrain.model.kv_cache import make_cache
from pretrain.objective.likelihood import answer_nll, draw_seed
from pretrain.objective.sampler import (
    REMASKING,
    check_settings,
    cut_completion,
    generate,
    generate_block_rows,
    left_pad,
)

log = logging.getLogger(__name__)
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "gen_length", "steps", "block_length", "cfg",
              "remasking", "threshold", "factor", "cache"}


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise ValueError(f"llada model arg {name}={value!r} is not an integer")
    if int(value) < minimum:
        raise ValueError(f"llada model arg {name}={value} must be >= {minimum}")
    return int(value)


@register_model("llada")
class LLaDAHarness(LM):
    def __init__(self, source: str | None = None, step: int | None = None, mc_num: int = CHOICE_MC_NUM,
                 batch_size: int = 32,
                 seed: int = 0, check_greedy: bool = True, gen_length: int | None = None, steps: int | None = None,
                 block_length: int | None = None, cfg: float = 0.0, remasking: str = "low_confidence",
                 temperature: float = 0.0, threshold: float | None = None, factor: float | None = None,
                 cache: str = "none", device: str | None = None, dtype: str = "auto",
                 max_batch_size: int | None = None):
        super().__init__()
        if source is None:
            raise ValueError("llada: give the model as source=RUN_DIR_OR_FOLDER in --model_args")
        self.mc_num, self.batch_size, self.seed = _int("mc_num", mc_num), _int("batch_size", batch_size), int(seed)
        self.check_greedy = check_greedy in (True, "true", "True", 1)
        self.defaults = {"gen_length": gen_length, "steps": steps, "block_length": block_length, "cfg": float(cfg),
                         "remasking": remasking, "temperature": float(temperature),
                         "threshold": None if threshold in (None, "None", "none") else float(threshold),
                         "factor": None if factor in (None, "None", "none") else float(factor), "cache": cache}
        if remasking not in REMASKING:
            raise ValueError(f"llada model arg remasking={remasking!r} is not one of {', '.join(REMASKING)}")
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._rank = int(os.environ.get("RANK", "0"))
        if self._world_size > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            cuda = torch.cuda.is_available() and device in (None, "auto", "cuda")
            if cuda:
                torch.cuda.set_device(local)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
            device = f"cuda:{local}" if cuda else (device or "cpu")
        self.source = open_source(source, None if step is None else _int("step", step, 0))
        self._device = torch.device(pick_device(device or "auto"))
        self.model = load_model(self.source, self._device, pick_dtype(dtype, str(self._device)))
        self.tok = self.source.tokenizer()
        try:  # a cache that does not serve the model is refused before any request
            make_cache(cache, self.source.model.block_size)
        except ValueError as e:
            raise ValueError(f"llada model arg {e}") from None
        self.max_length = self.source.model.max_sequence_length

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LLaDAHarness:
        """lm-eval passes --batch_size (default 1) and --device besides --model_args; a value in
        --model_args wins over the flag's."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LLaDAHarness:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- the collectives lm-eval's evaluator uses with several processes --------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(tensor.reshape(-1)) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.reshape(-1).contiguous())
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        dist.barrier()

    @property
    def tokenizer_name(self) -> str:
        return str(self.source.tokenizer_path)

    # -- tokens -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.encode, self.source.eos_id, context, continuation)  # as evaluate --choices

    def fit(self, context: list[int], continuation: list[int], where: str) -> list[int]:
        """The context cut from the left so that context + continuation fit the model."""
        room = self.max_length - len(continuation)
        if room < 1 or not continuation:
            raise ValueError(f"{where}: a continuation of {len(continuation)} tokens cannot be scored by a model of "
                             f"{self.max_length} positions")
        return context[-room:]

    # -- requests -----------------------------------------------------------------------------------
    def announce(self, requests, kind: str) -> None:
        print(f"llada rank {self._rank}/{self._world_size}: {len(requests)} {kind} requests", file=sys.stderr,
              flush=True)

    def nll(self, context: list[int], continuation: list[int], item: int, choice: int) -> float:
        generator = torch.Generator().manual_seed(draw_seed(self.seed, item, choice))
        return answer_nll(self.model, context, continuation, self.source.mask_id, self.mc_num, generator,
                          self.batch_size, self._device, self.source.model.block_size)[0]  # a block model: block NELBO

    @torch.no_grad()
    def greedy(self, context: list[int], continuation: list[int]) -> bool:
        """The published suffix_greedy_prediction: unmask the continuation one most-confident token a step."""
        mask_id = self.source.mask_id
        x = torch.tensor([context + [mask_id] * len(continuation)], device=self._device)
        for _ in continuation:
            masked = x == mask_id
            logits = self.model(x)[masked].float()
            logits[:, mask_id] = float("-inf")
            confidence, prediction = logits.softmax(-1).max(-1)
            best = confidence.argmax()
            positions = masked.nonzero()[:, 1]
            x[0, positions[best]] = prediction[best]
        return x[0, len(context):].tolist() == continuation

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.announce(requests, "loglikelihood")
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self.encode_pair(context, continuation)
            ctx = self.fit(ctx, cont, f"{req.task_name} document {req.doc_id}")
            ll = -self.nll(ctx, cont, req.doc_id or 0, req.idx or 0)
            greedy = self.greedy(ctx, cont) if self.check_greedy else False
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.announce(requests, "loglikelihood_rolling")
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(self.encode(text), self.source.eos_id, self.max_length - 1, 1)]
            ll = -sum(self.nll(ctx, cont, req.doc_id or 0, i) for i, (ctx, cont) in enumerate(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    def settings(self, gen_kwargs: dict) -> dict:
        unknown = set(gen_kwargs) - GEN_KWARGS
        if unknown:
            log.warning("llada: ignoring gen_kwargs %s (the sampler takes %s)", sorted(unknown), sorted(GEN_KWARGS))
        s = {k: gen_kwargs.get(k, v) for k, v in self.defaults.items()}
        if not gen_kwargs.get("do_sample", True) and "temperature" not in gen_kwargs:
            s["temperature"] = 0.0
        s["gen_length"] = int(s["gen_length"] or gen_kwargs.get("max_gen_toks") or 128)
        s["steps"] = int(s["steps"] or s["gen_length"])
        s["block_length"] = int(s["block_length"] or s["gen_length"])
        for key in ("threshold", "factor"):
            s[key] = None if s[key] is None else float(s[key])
        check_settings(s["gen_length"], s["steps"], s["block_length"], s["remasking"], s["cfg"], s["temperature"],
                       s["threshold"], s["factor"])
        try:
            make_cache(s["cache"], self.source.model.block_size)
        except ValueError as e:
            raise ValueError(f"llada gen_kwargs {e}") from None
        until = gen_kwargs.get("until") or []
        s["until"] = [until] if isinstance(until, str) else list(until)
        return s

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.announce(requests, "generate_until")
        jobs = defaultdict(list)  # settings -> request indices: batched, left-padded
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            s = self.settings(dict(gen_kwargs or {}))
            room = self.max_length - s["gen_length"]
            if room < 1:
                raise ValueError(f"{req.task_name}: gen_length={s['gen_length']} leaves no room for the prompt in "
                                 f"the model's {self.max_length} positions")
            ids = (self.encode(context) or [self.source.eos_id])[-room:]  # a long prompt loses its beginning
            prepared.append((ids, s))
            jobs[tuple(sorted((k, str(v)) for k, v in s.items()))].append(i)
        out = [""] * len(requests)
        for indices in jobs.values():
            for lo in range(0, len(indices), self.batch_size):
                batch = indices[lo: lo + self.batch_size]
                s = prepared[batch[0]][1]
                prompt, prompt_mask = left_pad([prepared[i][0] for i in batch], self.source.eos_id, self._device)
                seed = self.seed * 1_000_003 + (requests[batch[0]].doc_id or 0)
                block_size = self.source.model.block_size
                if block_size:  # a block diffusion model: each row alone (objective/sampler.py)
                    x = generate_block_rows(self.model, prompt, prompt_mask, s["gen_length"], s["steps"],
                                            self.source.mask_id, block_size, s["temperature"], s["cfg"],
                                            s["remasking"], seed, s["threshold"], s["factor"],
                                            partial(make_cache, s["cache"], block_size))
                else:
                    x = generate(self.model, prompt, s["gen_length"], s["steps"], self.source.mask_id,
                                 s["block_length"], s["temperature"], s["cfg"], s["remasking"], seed, s["threshold"],
                                 s["factor"], prompt_mask, make_cache(s["cache"], None))
                for i, row in zip(batch, x[:, prompt.shape[1]:].tolist(), strict=True):
                    out[i] = cut_completion(row, self.tok.decode, self.source.eos_id, s["until"])[1]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out
