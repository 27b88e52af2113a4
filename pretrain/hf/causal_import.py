"""Warm start from an autoregressive Hugging Face model: `model.init_from=FOLDER` where FOLDER holds a
Llama (`LlamaForCausalLM`, Llama 3's RoPE scaling included), Qwen2, Qwen3 or Qwen3-MoE causal LM
(config.json and safetensors, one file or sharded). A Qwen3-MoE source gives `model.moe`: softmax
routing over its experts, top `num_experts_per_tok`, its `norm_topk_prob`, no shared expert, its
`mlp_only_layers` as the first dense layers; its per-expert tensors (`mlp.experts.{j}.*_proj`) are
stacked into ours, its router (`mlp.gate`) is ours. Dream 7B (from Qwen2.5), DiffuLLaMA (from Llama 2), RND1 and dllm's
A2D recipes (from Qwen3) start this way. LLaDA-MoE-7B-A1B (`LLaDAMoEModelLM`, bidirectional, Qwen3-MoE's names)
is read the same way, its config.json mapped by pretrain/hf/lladamoe_format.py.

    python -m pretrain.hf.causal_import FOLDER [NAME]   # prints the model section that FOLDER gives a run

`model.init_from=FOLDER` without `model=` on the command line takes the architecture from FOLDER
(pretrain/hf/folder_model.py), as from_pretrained does; an explicit `model=` must describe the source
(conf/model/qwen2_5_0_5b.yaml, llama3_2_1b.yaml, or the printed YAML saved as conf/model/NAME.yaml):
the first key that differs is named. The weights are renamed to ours
(`model.layers.{i}.self_attn.q_proj` -> `transformer.blocks.{i}.q_proj`, ...): both sides use the
rotate-half RoPE, so no permutation. The data must be built with the source's tokenizer
(data.tokenizer=FOLDER/tokenizer.json, or any byte-identical copy: the contents are compared, and the
copy the build keeps in data.dir is used when data.tokenizer is not given), which decides the mask
token (data_pipeline/tokenizer.py):
  - tokenizer: the tokenizer has <|mdm_mask|>; its row is the source's.
  - reserved:  a token the tokenizer reserves unused (Llama 3's <|reserved_special_token_N|>); its row is
               the source's (never trained on, never produced).
  - added:     <|mdm_mask|> appended after the tokenizer's tokens. Its row of the embedding (and of the
               head, if untied) is set to the mean of the tokenizer's rows; where the source has no
               row there (Qwen pads its embedding beyond the tokenizer, Llama 3 does not), embedding
               and head grow by one row. Every other row is the source's.
The choice is recorded as model.mask_token ({token, id, origin}) in config.yaml and as
mask_token_id / mask_token_origin in the export. Any other architecture is refused, and so are
pickle weights (pytorch_model.bin): torch.load of a downloaded file runs its code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from data_pipeline.tokenizer import DIFFUSION_MASKS, ensure_special_tokens, fingerprint, mask_token
from pretrain.config import ModelConfig
from pretrain.hf.folder_files import INDEX, WEIGHTS, weight_map, weights_path
from pretrain.hf.format import FormatError, read_config
from pretrain.hf.lladamoe_format import ARCHITECTURES as LLADAMOE_ARCHITECTURES
from pretrain.hf.lladamoe_format import LAYER_NAMES as LLADAMOE_LAYER_NAMES
from pretrain.hf.lladamoe_format import is_lladamoe
from pretrain.hf.lladamoe_format import source_fields as lladamoe_fields

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", **LLADAMOE_ARCHITECTURES}
# The model.* keys that decide the weights' shapes and meaning: the run's must be the source's.
MATCHED = ("n_layers", "d_model", "n_heads", "n_kv_heads", "mlp_hidden_size", "head_dim", "rope_theta",
           "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings", "rope_scaling", "partial_rotary_factor", "moe")
# The model.moe keys that decide the weights' meaning (the rest, expert bias and auxiliary losses, are
# the run's training choices; a Qwen3-MoE source suggests its router_aux_loss_coef).
MOE_MATCHED = ("num_experts", "top_k", "expert_hidden_size", "num_shared_experts", "first_dense_layers",
               "score_func", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob")
LAYER_NAMES = {  # theirs (under model.layers.{i}.) -> ours (under transformer.blocks.{i}.)
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ff_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight", "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight", "self_attn.o_proj.weight": "attn_out.weight",
    "self_attn.q_proj.bias": "q_proj.bias", "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias", "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.k_norm.weight": "k_norm.weight", "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight", "mlp.down_proj.weight": "ff_out.weight",
    "mlp.gate.weight": "moe.router.weight",  # Qwen3-MoE's router
    **LLADAMOE_LAYER_NAMES,  # LLaDA-MoE's shared expert
}
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")  # mlp.experts.{j}.{name}.weight -> moe.experts.{name} [E, ...]
TOP_NAMES = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
             "lm_head.weight": "transformer.ff_out.weight"}


def is_llada(config: dict) -> bool:
    """A LLaDA export (ours, or GSAI-ML's); LLaDA-MoE's Hub config.json says model_type "llada" too."""
    return config.get("model_type") == "llada" and not is_lladamoe(config)


def source_kind(config: dict, where: str) -> str:
    archs = config.get("architectures") or []
    kind = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if kind is None:
        name = archs[0] if archs else f"model_type={config.get('model_type')!r}"
        raise FormatError(f"{where}/config.json: architecture {name} is not supported as a warm start "
                          f"(supported: {', '.join(ARCHITECTURES)}, or a LLaDA export)")
    return kind


def source_fields(config: dict, where: str) -> dict:
    """The model.* values of a source's config.json; refuses what our block does not compute."""
    kind = source_kind(config, where)
    if kind == "llada_moe":
        return lladamoe_fields(config, where)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps"):
        if key not in config:
            raise FormatError(f"{where}/config.json has no {key!r}")
    refused = [("hidden_act", config.get("hidden_act", "silu") != "silu"), ("mlp_bias", bool(config.get("mlp_bias"))),
               ("attention_bias", bool(config.get("attention_bias"))),  # Llama/Qwen3: a bias on o_proj too
               ("use_sliding_window", bool(config.get("use_sliding_window")))]
    for key, bad in refused:
        if bad:
            raise FormatError(f"{where}/config.json: {key}={config[key]!r} is not supported (our block has "
                              f"SwiGLU with silu, no MLP or output-projection biases, full attention)")
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise FormatError(f"{where}/config.json: rope_scaling={scaling} is not supported (only Llama 3's)")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    moe = moe_fields(config, where) if kind == "qwen3_moe" else None
    return dict(moe=moe, n_layers=config["num_hidden_layers"], d_model=d, n_heads=heads,
                n_kv_heads=config.get("num_key_value_heads") or heads, mlp_hidden_size=config["intermediate_size"],
                vocab_size=config["vocab_size"], max_sequence_length=config.get("max_position_embeddings", 4096),
                rope_theta=float(config.get("rope_theta", 10000.0)), rms_norm_eps=float(config["rms_norm_eps"]),
                head_dim=None if head_dim * heads == d else head_dim, qkv_bias=kind == "qwen2",
                qk_norm=kind in ("qwen3", "qwen3_moe"), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope_scaling=None if scaling is None else {k: scaling[k] for k in sorted(scaling) if k != "type"},
                partial_rotary_factor=1.0)


def moe_fields(config: dict, where: str) -> dict:
    """model.moe of a Qwen3-MoE config.json: its MoE layers must be every layer after its dense ones."""
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if key not in config:
            raise FormatError(f"{where}/config.json has no {key!r}")
    dense = sorted(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step", 1)
    if step != 1 or dense != list(range(len(dense))):
        raise FormatError(f"{where}/config.json: decoder_sparse_step={step}, mlp_only_layers={dense} is not "
                          "supported (our MoE layers are every layer after the first dense ones)")
    return dict(num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                expert_hidden_size=config["moe_intermediate_size"], num_shared_experts=0,
                first_dense_layers=len(dense), score_func="softmax", expert_bias=False, bias_update_rate=0.0,
                n_group=1, topk_group=1, routed_scaling_factor=1.0,
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0)


def matched(key: str, value):
    """What must agree between the run and the source: for model.moe, its MOE_MATCHED keys."""
    if key != "moe" or value is None:
        return value
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k)
    return {k: get(k) for k in MOE_MATCHED}


# -- the mask token ----------------------------------------------------------------------------------
def mask_choice(folder: str | Path, data_tokenizer: str | None, rows: int) -> dict:
    """{token, id, origin, new_rows, mean_of}: the mask token of a run from `folder` on data tokenized with
    `data_tokenizer`; `new_rows`: the ids whose rows are set to the mean of rows [0, mean_of)."""
    from data_pipeline.tokenizer import load_tokenizer

    folder = Path(folder)
    source = folder / "tokenizer.json"
    if not source.is_file():
        raise FormatError(f"{folder}: no tokenizer.json (the mask token and the data come from the source's)")
    if not data_tokenizer:
        raise FormatError(f"{folder} is not a LLaDA export: tokenize the data with its tokenizer, "
                          f"data.tokenizer={source}")
    try:
        raw = Tokenizer.from_file(str(source))
        data = load_tokenizer(data_tokenizer)
    except Exception as e:  # DataError, or tokenizers' bare Exception for a malformed file
        raise FormatError(f"{source}: unreadable tokenizer ({e})") from None
    ours = ensure_special_tokens(Tokenizer.from_file(str(source)))
    if fingerprint(data) != fingerprint(ours):
        raise FormatError(f"data.tokenizer={data_tokenizer} is not {source} (the data must use the source's tokens)")
    token = mask_token(ours)
    origin = "added" if raw.token_to_id(token) is None else "tokenizer" if token in DIFFUSION_MASKS else "reserved"
    added = sorted(ours.token_to_id(t) for t in ours.get_vocab(with_added_tokens=True) if raw.token_to_id(t) is None)
    return {"token": token, "id": ours.token_to_id(token), "origin": origin, "new_rows": added,
            "mean_of": min(raw.get_vocab_size(with_added_tokens=True), rows)}


def resolved_vocab(source_rows: int, mask: dict) -> int:
    """The source's rows, grown to hold the added tokens (one more row each beyond the source's)."""
    return max([source_rows, *(i + 1 for i in mask["new_rows"])])


def check_source(folder: str, model: ModelConfig, data_tokenizer: str | None) -> None:
    """The run's model.* against the source (first difference named); fills model.mask_token and, when
    null, model.vocab_size. Cheap: reads config.json and the tokenizers, no weights."""
    config = read_config(folder)
    fields = source_fields(config, folder)
    weights_index(folder)  # refuses pickle-only folders before any work
    for key in MATCHED:
        theirs, ours = matched(key, fields[key]), matched(key, getattr(model, key))
        if ours != theirs:
            first = next((f"model.{key}.{k} differs; " for k in MOE_MATCHED if key == "moe" and ours and theirs
                          and ours[k] != theirs[k]), "")
            raise FormatError(f"{folder}/config.json gives model.{key}={theirs!r}, but model.{key}="
                              f"{ours!r} ({first}model={model.name}; python -m pretrain.hf.causal_import "
                              f"{folder} prints the config that fits)")
    mask = mask_choice(folder, data_tokenizer, fields["vocab_size"])
    vocab = resolved_vocab(fields["vocab_size"], mask)
    if model.vocab_size is not None and model.vocab_size != vocab:
        raise FormatError(f"{folder}: model.vocab_size={model.vocab_size}, but the source's {fields['vocab_size']} "
                          f"rows with the mask token give {vocab} (set model.vocab_size=null)")
    model.vocab_size = vocab
    model.mask_token = mask


# -- weights -----------------------------------------------------------------------------------------
def weights_index(folder: str | Path) -> dict[str, str]:
    """Their tensor name -> the safetensors file that holds it (one file, or a sharded index)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in (INDEX, WEIGHTS)):
        return weight_map(folder)  # read inside the folder, size-capped (pretrain/hf/folder_files.py)
    if any(folder.glob("pytorch_model*.bin")):
        raise FormatError(f"{folder}: only pickle weights (pytorch_model.bin), which are refused; convert them to "
                          f"safetensors (transformers: model.save_pretrained(out, safe_serialization=True))")
    raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")


@dataclass
class CausalWeights:
    """A source's tensors under our names (HFWeights' interface), the mask rows made as mask_choice says."""
    folder: Path
    ours: dict[str, tuple[str, str]]  # our name -> (their name, file)
    mask: dict
    vocab: int
    stacked: dict[str, list[tuple[str, str]]]  # our experts' name -> each expert's (their name, file), in order

    @staticmethod
    def open(folder: str | Path, model: ModelConfig) -> CausalWeights:
        folder = Path(folder)
        ours, experts = {}, {}
        for theirs, file in weights_index(folder).items():
            if theirs in TOP_NAMES:
                name = TOP_NAMES[theirs]
            elif theirs.startswith("model.layers."):
                i, rest = theirs[len("model.layers."):].split(".", 1)
                parts = rest.split(".")
                if (len(parts) == 5 and parts[:2] == ["mlp", "experts"] and parts[2].isdigit()
                        and parts[3] in EXPERT_NAMES and parts[4] == "weight"):
                    experts[(f"transformer.blocks.{i}.moe.experts.{parts[3]}", int(parts[2]))] = (theirs, file)
                    continue
                if rest not in LAYER_NAMES:
                    raise FormatError(f"{folder}: tensor {theirs} has no place in our block")
                name = f"transformer.blocks.{i}.{LAYER_NAMES[rest]}"
            elif theirs.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old exports saved; recomputed from rope_theta
            else:
                raise FormatError(f"{folder}: tensor {theirs} has no place in our model")
            ours[name] = (theirs, file)
        if model.tie_embeddings:
            ours.pop("transformer.ff_out.weight", None)  # some tied checkpoints store the head as well
        stacked = {}
        for (name, j), entry in sorted(experts.items()):
            stacked.setdefault(name, []).append(entry)
            if j != len(stacked[name]) - 1:
                raise FormatError(f"{folder}: {name.replace('transformer.blocks.', 'layer ')}: expert {j} follows "
                                  f"{len(stacked[name]) - 1} experts (their numbers must run 0, 1, ...)")
        return CausalWeights(folder, ours, model.mask_token, model.vocab_size, stacked)

    def get(self, name: str) -> torch.Tensor:
        if name in self.stacked:  # one tensor per expert -> ours, stacked [E, ...]
            tensors = []
            for theirs, file in self.stacked[name]:
                with safe_open(weights_path(self.folder, file), framework="pt") as f:
                    tensors.append(f.get_tensor(theirs))
            return torch.stack(tensors)
        theirs, file = self.ours[name]
        with safe_open(weights_path(self.folder, file), framework="pt") as f:
            tensor = f.get_tensor(theirs)
        if name in ("transformer.wte.weight", "transformer.ff_out.weight") and self.mask and self.mask["new_rows"]:
            tensor = self.with_new_rows(tensor)
        return tensor

    def with_new_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of added tokens: the mean of the tokenizer's rows (in fp32); grown where the source has none."""
        if tensor.shape[0] < self.vocab:
            tensor = torch.cat([tensor, tensor.new_zeros(self.vocab - tensor.shape[0], tensor.shape[1])])
        else:
            tensor = tensor.clone()
        mean = tensor[: self.mask["mean_of"]].float().mean(dim=0).to(tensor.dtype)
        for i in self.mask["new_rows"]:
            tensor[i] = mean
        return tensor

    def shapes(self) -> dict[str, torch.Size]:
        shapes = {}
        for name, (theirs, file) in self.ours.items():
            with safe_open(weights_path(self.folder, file), framework="pt") as f:
                shape = list(f.get_slice(theirs).get_shape())
            if name in ("transformer.wte.weight", "transformer.ff_out.weight"):
                shape[0] = max(shape[0], self.vocab)
            shapes[name] = torch.Size(shape)
        for name, entries in self.stacked.items():
            theirs, file = entries[0]
            with safe_open(weights_path(self.folder, file), framework="pt") as f:
                shapes[name] = torch.Size([len(entries), *f.get_slice(theirs).get_shape()])
        return shapes

    def check_names(self, expected: dict[str, torch.Size]) -> None:
        found = self.shapes()
        for name, shape in expected.items():
            if name not in found:
                raise FormatError(f"{self.folder}: no tensor for {name}")
            if tuple(found[name]) != tuple(shape):
                raise FormatError(f"{self.folder}: {self.ours[name][0]} has shape {list(found[name])}, the model "
                                  f"expects {list(shape)}")
        extra = [self.ours[n][0] if n in self.ours else self.stacked[n][0][0] for n in found if n not in expected]
        if extra:
            raise FormatError(f"{self.folder}: tensor {extra[0]} has no place in the model")


def model_yaml(folder: str, name: str) -> str:
    fields = source_fields(read_config(folder), folder)
    fields["vocab_size"] = None  # resolved at start: the source's rows, plus the mask token's if it adds one
    lines = [f"# A warm start from {folder} (python -m pretrain.hf.causal_import).", f"name: {name}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]
    lines += ["init_std: 0.02", "attention: auto", f"init_from: {folder}", "document_mask: false",
              "attention_anneal_steps: 0", "shift_prediction: false", "mask_token: null"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m pretrain.hf.causal_import FOLDER [NAME]\n\n{__doc__}")
        sys.exit(0)
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: python -m pretrain.hf.causal_import FOLDER [NAME]\n{__doc__}")
    try:
        print(model_yaml(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else Path(sys.argv[1]).name), end="")
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
