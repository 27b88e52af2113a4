"""Every start-up check of a run, in one place: a composed config in, a validated RunConfig out.

Each domain owns its checks (the model's shapes, the mask schedule, the engine's DeepSpeed section,
the sampler's settings, init_from against its folder); this module runs them all, after
pretrain/config.py's structure and plain values, before any expensive work. `validate_data` then
checks the shards a run will read against its model.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from safetensors import SafetensorError

from data_pipeline.config import compose
from data_pipeline.piece import pad_vocab
from data_pipeline.shards import Manifest
from data_pipeline.tokenizer import fingerprint, load_tokenizer
from pretrain.config import ConfigError, RunConfig, check_values, parse_config, require, total_steps
from pretrain.domains import check_domains
from pretrain.engine import ds_config, expert_parallel, sequence_parallel
from pretrain.engine.device import resolve_precision
from pretrain.engine.zero_sizes import resolve_zero_sizes
from pretrain.hf.causal_import import is_llada
from pretrain.hf.folder_model import model_from_folder
from pretrain.hf.format import FormatError, HFWeights, read_config
from pretrain.hf.pretrained import check_init_from
from pretrain.model import transformer
from pretrain.model.kv_cache import make_cache
from pretrain.objective import block, diffusion
from pretrain.objective.sampler import GenerateError, check_settings


def load_config(cfg: DictConfig, world_size: int = 1, overrides: list[str] | None = None) -> RunConfig:
    """Hydra's composed config -> a validated RunConfig (precision resolved for this machine). With the
    command line's overrides, model.init_from without model= takes the architecture from the folder."""
    if overrides is not None:
        try:
            model_from_folder(cfg, overrides)
        except FormatError as e:
            raise ConfigError(f"model.init_from={cfg.model.init_from}: {e}") from None
    run = parse_config(cfg)
    check_domains(run)  # first: the derived sizes below divide by model.n_heads
    run.deepspeed = resolve_zero_sizes(run.deepspeed, run.model)
    check_run(run, world_size)
    t = run.trainer  # the size the model serves with: the one its last step trains with (saved, exported)
    run.model.block_size = block.inference_block_size(run.block, t.seq_len, t.global_batch_size * t.seq_len,
                                                      total_steps(t))
    try:  # the cache must serve the model as it serves: prefix/dual (full attention) or block
        make_cache(run.sample.cache, run.model.block_size)
    except ValueError as e:
        raise ConfigError(f"sample.{e}") from None
    run.trainer.precision = resolve_precision(run.trainer.precision, run.cluster.device)
    return run


def compose_config(overrides: list[str], world_size: int = 1) -> RunConfig:
    """The validated config a `python -m pretrain.train OVERRIDES...` run would get (for tools and tests)."""
    return load_config(compose(overrides), world_size, overrides)


def check_run(run: RunConfig, world_size: int) -> None:
    sequence_parallel.check_config(run, world_size)  # first: the batch math below counts world / N ranks
    check_values(run, sequence_parallel.data_parallel_size(run, world_size))
    transformer.check_config(run.model, run.trainer.seq_len, run.trainer.activation_checkpointing)
    if run.model.init_from:
        try:
            config = check_init_from(run.model.init_from, run.model, run.data.tokenizer or shards_tokenizer(run))
            if is_llada(config):  # a causal source's weights are checked by causal_import.check_source
                check_init_weights(run.model.init_from)
        except FormatError as e:
            raise ConfigError(f"model.init_from={run.model.init_from}: {e}") from None
    diffusion.check_config(run.mask, run.trainer.seq_len)
    block.check_config(run.block, run.model, run.mask, run.trainer.seq_len)
    ds_config.check_config(run)
    expert_parallel.check_config(run, world_size)
    if run.sample.at_end:  # a bad sampling setting would otherwise fail only after training
        s = run.sample
        try:
            check_settings(s.gen_length, s.steps, s.block_length, "low_confidence", 0.0, s.temperature, s.threshold,
                           s.factor)
        except GenerateError as e:
            raise ConfigError(f"sample: {e}") from None
        prompts = [s.prompt] if isinstance(s.prompt, str) else s.prompt
        require(isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts),
                f"sample.prompt={s.prompt!r} is not a non-empty string or a list of them")


def check_init_weights(folder: str) -> None:
    """The folder's weights are safetensors (read without running anything), found before any work;
    pickled weights (pytorch_model.bin) can run code when loaded, so they are named and never loaded
    (pretrain/hf/folder_files.weight_map)."""
    try:
        HFWeights.open(folder)
    except (OSError, ValueError, SafetensorError) as e:  # an unreadable file or index, a header that does not parse
        raise FormatError(f"{folder}: the weights cannot be read ({type(e).__name__}: {e})") from None


def resolve_vocab(run: RunConfig, manifest=None) -> None:
    """model.vocab_size=null takes the shards' vocabulary (padded to a multiple of 128 by the build):
    the manifest's when the shards exist, else what a build of data= would produce."""
    if run.model.vocab_size is not None:
        return
    if manifest is None and (Path(run.data.dir) / "manifest.json").is_file():
        manifest = Manifest.load(run.data.dir)
    if manifest is not None:
        run.model.vocab_size = manifest.vocab_size
        return
    if run.data.tokenizer:
        run.model.vocab_size = pad_vocab(load_tokenizer(run.data.tokenizer).get_vocab_size())
    else:
        run.model.vocab_size = pad_vocab(run.data.vocab_size)


def shards_tokenizer(run: RunConfig) -> str | None:
    """The tokenizer.json the shards in data.dir were built with (the build keeps a copy there), if any:
    a warm start compares its content with the source's, so data.dir alone is enough."""
    path = Path(run.data.dir) / "tokenizer.json"
    return str(path) if path.is_file() else None


def validate_data(run: RunConfig, manifest: Manifest) -> None:
    """The shards in data.dir must fit this run's model and sequence length."""
    resolve_vocab(run, manifest)
    where = f"{run.data.dir}/manifest.json"
    require(manifest.seq_len == run.trainer.seq_len,
            f"{where}: seq_len={manifest.seq_len} but trainer.seq_len={run.trainer.seq_len}; add "
            f"trainer.seq_len={manifest.seq_len} to train on these shards, or rebuild them")
    # The ids must fit the model; the build's padding (to a multiple of 128) need not, for a source's vocabulary.
    require((manifest.tokenizer_vocab_size if run.model.mask_token else manifest.vocab_size) <= run.model.vocab_size,
            f"{where}: vocab_size={manifest.vocab_size} exceeds model.vocab_size={run.model.vocab_size} "
            f"(model={run.model.name})")
    if run.data.tokenizer:
        require(fingerprint(load_tokenizer(run.data.tokenizer)) == manifest.tokenizer_fingerprint,
                f"{where}: the shards were tokenized with another tokenizer than data.tokenizer={run.data.tokenizer}")
    if run.model.mask_token is not None:  # a warm start from an autoregressive model (pretrain/hf/causal_import.py)
        require(run.model.mask_token["id"] == manifest.mask_id,
                f"model.init_from={run.model.init_from}: the mask token {run.model.mask_token['token']} is id "
                f"{run.model.mask_token['id']}, but {where} has mask_id={manifest.mask_id} (another tokenizer)")
    elif run.model.init_from:
        hf = read_config(run.model.init_from)
        require(hf.get("mask_token_id") == manifest.mask_id,
                f"model.init_from={run.model.init_from}: mask_token_id={hf.get('mask_token_id')}, but {where} has "
                f"mask_id={manifest.mask_id} (another tokenizer)")
        require(hf.get("vocab_size") == run.model.vocab_size,
                f"model.init_from={run.model.init_from}: vocab_size={hf.get('vocab_size')}, but model.vocab_size="
                f"{run.model.vocab_size}")
    m = run.mask
    if m.conditional:
        require(manifest.format == "sft" or m.prompt_len is not None,
                f"{where}: format={manifest.format} shards carry no prompt lengths; mask.conditional=true needs "
                f"shards built with data.format=sft, or mask.prompt_len")
        require(manifest.max_prompt_len < run.trainer.seq_len,
                f"{where}: max_prompt_len={manifest.max_prompt_len} is not below trainer.seq_len="
                f"{run.trainer.seq_len}")
