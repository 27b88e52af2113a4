"""The data section of the config, and composing the shared `conf/` tree outside a Hydra app."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.shards import DataError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def path_slug(text: str, limit: int = 96) -> str:
    """A string made safe as one directory name that needs no shell quoting: `/`, `=`, `,` and other odd
    characters become `_`, and a long one is cut and given a hash of the whole, so distinct inputs stay
    distinct."""
    slug = re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("._") or "default"
    if len(slug) > limit:
        slug = f"{slug[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return slug


RUN_NAME_EXCLUDED = ("run_dir", "resume")  # where a run lives and whether it resumes do not name it


def swept_keys(argv: list[str]) -> set[str]:
    """The keys a Hydra sweep varies (`mask=linear,cosine`, `seed=range(3)`), read off the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # not overrides we can read: name the run from everything
        return set()
    return {o.get_key_element() for o in overrides if o.is_sweep_override()}


def run_name(overrides: list[str]) -> str:
    """`mask=cosine seed=2` -> `mask-cosine+seed-2`: readable, and a path a shell takes unquoted."""
    return path_slug("+".join(o.replace("=", "-", 1) for o in overrides))


def run_slug(task_overrides, argv: list[str] | None = None) -> str:
    """The default run directory's name. A single run: all its overrides (`model-tiny+seed-2`). A job of
    a sweep: `<the overrides the jobs share>/<the ones that differ>`, e.g. `model-tiny/mask-cosine+seed-2`,
    so each job's directory (and W&B run name) says what it varies."""
    import sys

    pairs = sorted(o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in RUN_NAME_EXCLUDED
                   and not o.startswith("hydra."))
    swept = swept_keys(sys.argv[1:] if argv is None else argv)
    if not swept:
        return run_name(pairs)
    varied = [o for o in pairs if o.split("=", 1)[0].lstrip("+~") in swept]
    shared = [o for o in pairs if o not in varied]
    return f"{run_name(shared) if shared else 'sweep'}/{run_name(varied)}"


# conf/config.yaml names the default run directory after the command-line overrides.
if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", path_slug)
if not OmegaConf.has_resolver("run_slug"):
    OmegaConf.register_new_resolver("run_slug", run_slug)


@dataclass
class DataConfig:
    inputs: list[str]  # files, folders or globs of .txt/.jsonl/.parquet (+.gz/.zst); "demo" = built-in corpus
    dir: str  # shards, manifest.json and tokenizer.json
    format: str  # text (packed documents) | sft (one prompt/response pair per window)
    text_field: str  # jsonl key / parquet column of a document (format=text)
    prompt_field: str  # (format=sft)
    response_field: str  # (format=sft)
    tokenizer: str | None  # a tokenizer.json; None = train a BPE on the corpus
    vocab_size: int  # for a trained tokenizer
    seq_len: int
    shard_bytes: int  # target size of one shard tar
    member_bytes: int  # target size of one tar member (many windows each: fast to stream)
    heldout_fraction: float  # share of documents (by hash) in the held-out split
    on_decode_error: str  # replace | skip: what to do with a document that is not valid UTF-8
    shuffle_buffer: int  # windows shuffled together when streaming
    num_workers: int  # DataLoader workers per rank
    batches_per_item: int  # micro-batches a worker passes to the trainer process at once
    url: str | None  # where the stream reads shards: None = data.dir, or a template like "pipe:cat {dir}/{name}"
    on_corrupt: str  # error | skip: a member that fails its checksum while streaming


@dataclass
class BuildConfig:
    workers: int  # processes that tokenize and write shards
    task: int  # this task's slice of the inputs (a SLURM array index)
    tasks: int  # number of slices
    merge: bool  # write manifest.json once every input is done (the array's last step sets it)
    progress: bool  # tokens/s on stderr: a bar on a terminal, plain lines otherwise
    progress_every_s: float  # seconds between the plain lines (not on a terminal)


class OverrideError(DataError):
    """An override naming a key the config tree does not have, or a config group option that does
    not exist: one line with the closest known names (Hydra's own message is several lines, exits
    1 and advises `+key=`, which would add the misspelt key and run without the intended setting)."""


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def compose(overrides: list[str]) -> DictConfig:
    """The config that `python -m pretrain.train OVERRIDES...` would see, without the `hydra` node.
    An unknown key or group option raises OverrideError."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    try:
        cfg = _compose(overrides)
    except HydraException as e:
        problem = override_problem(list(overrides), e)
        if problem is None:
            raise
        raise OverrideError(problem) from None
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _known_keys(overrides: list[str]) -> list[str]:
    """Every dotted key of the config tree as these overrides' group choices compose it (the
    overrides that compose), nodes included: what an override may name."""
    from hydra.errors import HydraException

    cfg = None
    for tried in (overrides, []):
        kept = list(tried)
        while cfg is None:
            try:
                cfg = _compose(kept)
            except HydraException:
                if not kept:
                    break
                kept.pop()  # drop the override that does not compose, then the one before it
        if cfg is not None:
            break
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, full + ".")

    if cfg is not None:
        walk(cfg, "")
    return keys


def override_problem(overrides: list[str], error: Exception) -> str | None:
    """One line for an override that names no key of the config tree or no option of a config
    group, with the closest known ones; None for any other composition error."""
    import difflib

    from hydra.errors import MissingConfigException

    text = str(error)
    if isinstance(error, MissingConfigException) and error.options is not None:
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        if not m:
            return None
        group, option = m.group(1), m.group(2)
        options = sorted(error.options)
        close = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"{group}={option}: conf/{group}/ has no such option; {hint}options: {', '.join(options)}")
    m = re.match(r"Could not override '([^']+)'", text)
    if not m:
        return None
    key = m.group(1)
    word = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
    others = [o for o in overrides if o != word]
    known = [k for k in _known_keys(others) if not k.startswith("hydra.")]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a misspelt last part alone: compare it with the last parts under the same section
        parent, _, leaf = key.rpartition(".")
        siblings = [k for k in known if k.rpartition(".")[0] == parent]
        close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(
            leaf, [k.rpartition(".")[2] for k in siblings], n=3, cutoff=0.5)]
    hint = f"closest known: {', '.join(close)}" if close else "no key of the config tree (conf/) is close to it"
    return f"{word}: unknown config key {key!r}; {hint}"


def check_command_line(argv: list[str]) -> str | None:
    """For an entry point whose arguments Hydra reads itself (pretrain.train): the one-line problem
    of an override that names an unknown key or group option, or None (other errors are Hydra's)."""
    from hydra.errors import HydraException

    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        _compose(overrides)
    except HydraException as e:
        return override_problem(overrides, e)
    return None


def _section(cfg: DictConfig, key: str, schema):
    try:
        section = OmegaConf.to_container(cfg[key], resolve=True)  # interpolations point outside the section
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))
    except OmegaConfBaseException as e:
        raise DataError(f"config: {str(e).splitlines()[0]} (key: {key}.{e.full_key or ''})".rstrip(".")) from None


def data_config(cfg: DictConfig) -> DataConfig:
    return _section(cfg, "data", DataConfig)


def build_config(cfg: DictConfig) -> BuildConfig:
    return _section(cfg, "build", BuildConfig)
