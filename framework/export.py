"""Hugging Face export and import.

    python -m framework.export checkpoint=runs/debug out=hf/debug format=hf

writes `config.json` (with our end-of-text id as bos/eos), `generation_config.json`,
`model.safetensors` and the tokenizer (`tokenizer.json` + `tokenizer_config.json`) that
`transformers` loads as GPT2LMHeadModel (gpt2-style flavors) or LlamaForCausalLM (llama-style)
plus AutoTokenizer: a tokenizers JSON file is copied; the built-in byte tokenizer is written as
an equivalent byte-level BPE without merges; tiktoken encodings are refused unless
`with_tokenizer=false`. Directory 0777 and files 0666, less the umask. The reverse,
`load_hf_weights`, initialises our model from such a directory (`model.init_from=<dir>`).
A classifier (model.num_labels > 0, task=classify) is written as GPT2ForSequenceClassification /
LlamaForSequenceClassification: our output head is their `score`, with id2label/label2id from
task.labels and pad_token_id = end-of-text, the padding our classify sources use, so HF picks the
same last text token as we do.

Both directions stream, for models larger than one host's memory: the export reads the
checkpoint one tensor at a time (DCP reads of single keys, from the shard files of any
strategy) and, above `max_shard_size` (HF's default 5GB), writes HF's sharded layout
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) one file at a time;
the import reads one tensor at a time (`hf_import_readers`, safetensors' safe_open), which
the meta build writes straight into each rank's shard (framework/parallel/materialize.py).

The name/layout mapping is written here by hand because it is ours: HF GPT-2 keeps fused
q|k|v in a transposed Conv1D (`c_attn`, shape (C, 3C)); Llama's names differ but its tensors
match ours one to one (both use the rotate-half RoPE layout).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.cli import entry, to_object
from framework.config import ConfigError
from framework.model import GPT, ModelConfig
from framework.model.rope import rope_scaling_from_hf, rope_scaling_to_hf

log = logging.getLogger("framework")


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    """A checkpoint dir, or a run dir / checkpoints dir (its `latest` is used)."""
    out: str = MISSING
    """Output directory (must not exist unless overwrite=true)."""
    format: str = "hf"
    dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    overwrite: bool = False
    with_tokenizer: bool = True
    """Write tokenizer files (tiktoken encodings cannot be: export them with false)."""
    max_shard_size: str = "5GB"
    """Above this, shards + model.safetensors.index.json (HF's default; "500MB" or bytes)."""


ConfigStore.instance().store(name="export_schema", node=ExportConfig)
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- ours -> HF --------------------------------------------------------------------------
def hf_config(m: ModelConfig) -> dict:
    cfg = _hf_config(m)
    if m.num_labels:
        kind = "GPT2" if m.style == "gpt2" else "Llama"
        cfg["architectures"] = [f"{kind}ForSequenceClassification"]
    return cfg


def classifier_fields(m: ModelConfig, labels: list[str] | None, pad_id: int | None) -> dict:
    """config.json fields of a sequence classifier: its labels, and the pad id by which
    transformers finds each row's last real token (without it, a batch of more than one row is
    refused and a single row is read at its very last position)."""
    if pad_id is None:
        raise ConfigError(
            "a classifier export needs the end-of-text id as pad_token_id: the checkpoint's "
            "data.tokenizer could not be loaded"
        )
    labels = list(labels) if labels else [f"LABEL_{i}" for i in range(m.num_labels)]
    if len(labels) != m.num_labels:
        raise ConfigError(f"task.labels {labels} do not match model.num_labels={m.num_labels}")
    return {
        "id2label": {str(i): str(x) for i, x in enumerate(labels)},
        "label2id": {str(x): i for i, x in enumerate(labels)},
        "pad_token_id": pad_id,
    }


def _hf_config(m: ModelConfig) -> dict:
    if m.style == "gpt2":
        if m.kv_heads != m.n_head:
            raise ConfigError(
                f"{m.name}: HF GPT-2 has no grouped-query attention (n_kv_head={m.kv_heads})"
            )
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_positions": m.block_size,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": m.ffn_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        # transformers 5 reads rope_parameters (theta + scaling), 4.x rope_scaling
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}
        | (rope_scaling_to_hf(m) or {}),
        "rope_scaling": rope_scaling_to_hf(m),
        "hidden_act": "silu",
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
    }


# An HF tensor is computed from a few of ours, read through a getter (name -> tensor, or None
# for a key the model does not have). The getter is a state dict's .get for an in-memory model,
# or a per-tensor DCP read for a checkpoint: the export then holds one HF tensor at a time.
Getter = Callable[[str], "torch.Tensor | None"]


def hf_recipes(m: ModelConfig) -> dict[str, Callable[[Getter], torch.Tensor]]:
    """HF tensor name -> how to build it from ours, in HF's usual order."""
    out: dict[str, Callable[[Getter], torch.Tensor]] = {}

    def one(ours: str, transpose: bool = False) -> Callable[[Getter], torch.Tensor]:
        return lambda get: get(ours).t() if transpose else get(ours)

    def cat(ours: list[str], transpose: bool = False) -> Callable[[Getter], torch.Tensor]:
        def build(get: Getter) -> torch.Tensor:
            # HF GPT-2 always has biases: zeros where we have none (created on the ambient
            # device, so a plan under `with torch.device("meta")` allocates nothing)
            parts = [get(k) for k in ours]
            parts = [torch.zeros(_bias_len(m, k)) if t is None else t for k, t in zip(ours, parts)]
            w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
            return w.t() if transpose else w

        return build

    if m.style == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = one("tok_emb.weight")
        out[p + "wpe.weight"] = one("pos_emb.weight")
        for i in range(m.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            # Conv1D keeps (in, out): fused q|k|v transposed, shape (C, C + 2 kv)
            out[h + "attn.c_attn.weight"] = cat(
                [f"{b}attn.{n}.weight" for n in ("wq", "wk", "wv")], True
            )
            out[h + "attn.c_proj.weight"] = one(b + "attn.wo.weight", True)
            out[h + "mlp.c_fc.weight"] = one(b + "mlp.w1.weight", True)
            out[h + "mlp.c_proj.weight"] = one(b + "mlp.w2.weight", True)
            out[h + "ln_1.weight"] = one(b + "attn_norm.weight")
            out[h + "ln_2.weight"] = one(b + "mlp_norm.weight")
            out[h + "attn.c_attn.bias"] = cat([f"{b}attn.{n}.bias" for n in ("wq", "wk", "wv")])
            for hf_name, ours in (
                ("attn.c_proj.bias", "attn.wo.bias"),
                ("mlp.c_fc.bias", "mlp.w1.bias"),
                ("mlp.c_proj.bias", "mlp.w2.bias"),
                ("ln_1.bias", "attn_norm.bias"),
                ("ln_2.bias", "mlp_norm.bias"),
            ):
                out[h + hf_name] = cat([b + ours])
        out[p + "ln_f.weight"] = one("norm.weight")
        out[p + "ln_f.bias"] = cat(["norm.bias"])
        if not m.tie_embeddings:
            out[_head_name(m)] = one("lm_head.weight")
    else:
        for ours, hf in _llama_names(m):
            out[hf] = one(ours)
    return out


def hf_meta_tensors(m: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The HF tensors' shapes and dtype, on `meta`: the plan of an export, and what an
    init_from directory must hold, without allocating a model."""
    with torch.device("meta"):
        sd = GPT(m).state_dict()
        return {k: f(sd.get).to(dtype) for k, f in hf_recipes(m).items()}


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names (contiguous, owned copies for safetensors)."""
    sd = model.state_dict()
    return {k: f(sd.get).detach().contiguous().clone() for k, f in hf_recipes(model.cfg).items()}


def _bias_len(m: ModelConfig, key: str) -> int:
    if ".wk." in key or ".wv." in key:
        return m.kv_heads * m.head_dim
    if ".w1." in key:
        return m.ffn_dim
    return m.n_embd


def _llama_names(m: ModelConfig) -> list[tuple[str, str]]:
    names = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    parts = {
        "attn.wq": "self_attn.q_proj",
        "attn.wk": "self_attn.k_proj",
        "attn.wv": "self_attn.v_proj",
        "attn.wo": "self_attn.o_proj",
        "mlp.w1": "mlp.gate_proj",
        "mlp.w3": "mlp.up_proj",
        "mlp.w2": "mlp.down_proj",
    }
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (b + "attn_norm.weight", h + "input_layernorm.weight"),
            (b + "mlp_norm.weight", h + "post_attention_layernorm.weight"),
        ]
        for ours, hf in parts.items():
            names.append((f"{b}{ours}.weight", f"{h}{hf}.weight"))
            if m.bias:
                names.append((f"{b}{ours}.bias", f"{h}{hf}.bias"))
    if not m.tie_embeddings:
        names.append(("lm_head.weight", _head_name(m)))
    return names


def _head_name(m: ModelConfig) -> str:
    """HF's name of our output head: a classifier's is `score` (*ForSequenceClassification)."""
    return "score.weight" if m.num_labels else "lm_head.weight"


# Hugging Face's size strings (transformers' save_pretrained, huggingface_hub): decimal units,
# and the binary ones transformers also reads. huggingface_hub's parser is private, so ours.
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_max_shard_size(value: int | str) -> int:
    """max_shard_size in bytes: an int (or a digit string, as Hydra may pass it), or a size
    such as "500MB", "5GB" (10^9 bytes, HF's default) or "2GiB"."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B)?", text, re.IGNORECASE)
    if match is None:
        raise ConfigError(
            f"max_shard_size={value!r} is not a size: give bytes (e.g. 500000000) or a number with "
            f"a unit ({', '.join(_SIZE_UNITS)}), such as 500MB or 5GB"
        )
    number, unit = match.groups()
    size = int(float(number) * (_SIZE_UNITS[unit.upper()] if unit else 1))
    if size <= 0:
        raise ConfigError(f"max_shard_size={value!r} must be positive")
    return size


def save_hf(
    model: GPT,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    labels: list[str] | None = None,
    pad_id: int | None = None,
) -> Path:
    """Export an in-memory model (see write_hf)."""
    sd = model.state_dict()
    return write_hf(model.cfg, sd.get, out, dtype, overwrite, tokenizer, max_shard_size, labels, pad_id)


def write_hf(
    m: ModelConfig,
    get: Getter,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    labels: list[str] | None = None,
    pad_id: int | None = None,
) -> Path:
    """Write config.json, generation_config.json, the weights and (given our tokenizer spec:
    'byte' or a tokenizers JSON file) the tokenizer files into `out`, atomically (a temp dir,
    then a rename), with the modes of any normally created file (umask applies).

    The weights are one `model.safetensors`, or, above `max_shard_size`, HF's shards
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (split as
    transformers does: in order, a tensor larger than the limit alone in its file). Each HF
    tensor is built from `get` when its file is written, and a file is released before the
    next: host memory holds one output file plus the tensor being read. A classifier
    (m.num_labels) also gets `labels` (id order) and `pad_id` (default: the tokenizer's EOT)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    limit = parse_max_shard_size(max_shard_size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"out={out} exists; pass overwrite=true to replace it")
    recipes = hf_recipes(m)
    split = split_torch_state_dict_into_shards(hf_meta_tensors(m, dtype), max_shard_size=limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        cfg = hf_config(m) | {"torch_dtype": str(dtype).removeprefix("torch.")}
        if tokenizer is not None:
            eot = write_tokenizer(tokenizer, tmp, m)
            # GPT-2's convention: one end-of-text token opens and ends documents; our shards
            # put it between documents and never prepend one, so a prompt starts bare.
            ids = {"bos_token_id": eot, "eos_token_id": eot}
            cfg |= ids
            # pad = eos keeps transformers' generate() from warning and guessing one.
            gen = ids | {"pad_token_id": eot}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            pad_id = eot if pad_id is None else pad_id
        if m.num_labels:
            cfg |= classifier_fields(m, labels, pad_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for filename, names in split.filename_to_tensors.items():
            shard = {k: recipes[k](get).detach().to(dtype).contiguous() for k in names}
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard  # before the next file's tensors are read
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _normal_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _normal_modes(d: Path) -> None:
    """mkdtemp makes 0700 (and safetensors' files may be 0600); an export is meant to be shared
    like any directory the user creates: 0777/0666 less the process umask."""
    umask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


# -- tokenizer files ---------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer (GPT-2's): printable
    Latin-1 bytes stand for themselves, the other 68 bytes map to code points 256.. in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable}
    chars |= {b: chr(256 + n) for n, b in enumerate(shifted)}
    return chars


def byte_tokenizer_json(eot_token: str = "<|endoftext|>"):
    """Our ByteTokenizer as a `tokenizers` Tokenizer: a BPE whose vocabulary is the 256 bytes at
    their own ids, with no merges (so every byte stays one token), and end-of-text as a special
    token at id 256. Same ids as ours for every text, except that the literal string
    '<|endoftext|>' becomes id 256 there (special tokens are matched in text by `tokenizers`)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    from framework.data.tokenizer import ByteTokenizer

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges the split cannot change the ids, and skipping it is faster.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eot_token, special=True)])
    # Self-check before anything is written: every 1-, 2-, 3- and 4-byte UTF-8 form and
    # whitespace runs must give our ids (a tokenizers upgrade that changed ByteLevel would show).
    probe = "".join(map(chr, range(0x250))) + "  \t\n日本語 😀 é"
    ours = ByteTokenizer()
    if tok.encode(probe).ids != ours.encode(probe) or tok.token_to_id(eot_token) != ours.eot_id:
        raise RuntimeError(
            "byte tokenizer export: the tokenizers version in use gives other ids than ours"
        )
    return tok


def write_tokenizer(spec: str, out: Path, m: ModelConfig) -> int:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(out)` loads,
    for our tokenizer `spec` (data.tokenizer of the checkpoint); returns the end-of-text id."""
    from framework.data.tokenizer import HFTokenizer, load_tokenizer

    if spec.startswith("tiktoken:"):
        raise ConfigError(
            f"data.tokenizer={spec}: a tiktoken encoding cannot be exported as Hugging Face "
            "tokenizer files here; pass with_tokenizer=false to export the weights and config only "
            "(then load the matching tokenizer yourself)"
        )
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"data.tokenizer={spec} of the checkpoint cannot be loaded ({e}); restore the file "
            "or pass with_tokenizer=false"
        ) from e
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"data.tokenizer={spec} has {tok.vocab_size} tokens but model.vocab_size={m.vocab_size}"
        )
    eot_token = HFTokenizer.EOT
    if isinstance(tok, HFTokenizer):  # a tokenizers file, or a directory's (its eos, its template)
        src = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        shutil.copyfile(src, out / "tokenizer.json")
        eot_token = tok.decode_token(tok.eot_id)
    else:
        byte_tokenizer_json(eot_token).save(str(out / "tokenizer.json"))
    tok_cfg = {
        # The generic fast class: it reads tokenizer.json as is (no slow-tokenizer files).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token,
        "eos_token": eot_token,
        "pad_token": eot_token,
        "model_max_length": m.block_size,
        "clean_up_tokenization_spaces": False,  # decode() must return the bytes we trained on
    }
    if tok.chat_template is not None:  # what task=sft data was rendered with
        tok_cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return tok.eot_id


# -- HF -> ours --------------------------------------------------------------------------
class HFWeights:
    """The tensors of a local HF directory, read one at a time: `model.safetensors.index.json`
    and its shards, else every `*.safetensors`, else `pytorch_model.bin` (memory-mapped,
    weights_only). Names and shapes come from the headers; a tensor is read when asked for.
    `rename` maps a file's names to the ones we look up (original GPT-2 files lack the
    "transformer." prefix)."""

    def __init__(self, path: str | Path, rename: Callable[[str], str] = lambda k: k):
        from safetensors import safe_open

        d, where = Path(path), f"model.init_from={path}"
        self._dir, self._bin = d, None
        # our lookup name -> (file, name in the file, shape)
        self._names: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        index = d / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{where}: {index} has no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            files = [f.name for f in sorted(d.glob("*.safetensors"))]
        if files:
            for name in files:
                if not (d / name).is_file():
                    raise ConfigError(f"{where}: {index} names {name}, which is missing")
                with safe_open(str(d / name), framework="pt") as f:  # reads the header only
                    for k in f.keys():
                        self._add(rename(k), name, k, tuple(f.get_slice(k).get_shape()), where)
        elif (d / "pytorch_model.bin").is_file():
            self._bin = torch.load(
                d / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True
            )
            for k, v in self._bin.items():
                self._add(rename(k), "pytorch_model.bin", k, tuple(v.shape), where)
        else:
            raise ConfigError(f"{where}: no {INDEX}, model.safetensors or pytorch_model.bin in {d}")

    def _add(self, name: str, file: str, key: str, shape: tuple[int, ...], where: str) -> None:
        if name in self._names:
            raise ConfigError(f"{where}: tensor {key} is in both {self._names[name][0]} and {file}")
        self._names[name] = (file, key, shape)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._names[name][2]

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key, _ = self._names[name]
        if self._bin is not None:
            return self._bin[key]
        # A file opened per read, not kept open: a kept handle keeps the pages it mapped
        # resident, so host memory would grow to the whole checkpoint while loading.
        with safe_open(str(self._dir / file), framework="pt") as f:
            return f.get_tensor(key)

    def get(self, name: str) -> torch.Tensor | None:
        return self[name] if name in self else None


def read_hf_config(path: str | Path) -> dict:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(
            f"model.init_from={path}: no config.json (a local Hugging Face model directory)"
        )
    return json.loads((d / "config.json").read_text())


# Every config.json field we know, per model_type. `model.init_from` refuses any other field
# (an unknown one may change the computation) and any known field whose value we do not
# implement; fields that only configure training, bookkeeping or generation defaults are ignored.
_IGNORED_ANY = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "tokenizer_class", "task_specific_params", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "is_encoder_decoder", "is_decoder", "prefix", "finetuning_task", "chunk_size_feed_forward",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "early_stopping",
    "length_penalty", "num_return_sequences", "bad_words_ids",
}  # fmt: skip
_IGNORED = {
    # dropout rates and the summary head are training / classification choices (ours:
    # model.dropout); reorder_and_upcast_attn only changes fp16 rounding, not the function.
    "gpt2": {"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
             "reorder_and_upcast_attn", "output_past"},
    # RoPE computes any position (our limit is model.block_size); pretraining_tp only splits
    # the same matmuls.
    "llama": {"attention_dropout", "max_position_embeddings", "pretraining_tp"},
}  # fmt: skip
# field -> values we implement (what the field must be, whatever our model config says)
_FIXED = {
    "gpt2": {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU's tanh form
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    },
    "llama": {"hidden_act": ("silu",)},
}


def _model_fields(m: ModelConfig) -> dict[str, tuple[object, str]]:
    """HF field -> (our value, our key): shapes and the numerics our ModelConfig sets."""
    if m.style == "gpt2":
        return {
            "vocab_size": (m.vocab_size, "model.vocab_size"),
            "n_positions": (m.block_size, "model.block_size"),
            "n_ctx": (m.block_size, "model.block_size"),
            "n_embd": (m.n_embd, "model.n_embd"),
            "n_layer": (m.n_layer, "model.n_layer"),
            "n_head": (m.n_head, "model.n_head"),
            "n_inner": (m.ffn_dim, "model.ffn_hidden"),
            "layer_norm_epsilon": (m.norm_eps, "model.norm_eps"),
        }
    return {
        "vocab_size": (m.vocab_size, "model.vocab_size"),
        "hidden_size": (m.n_embd, "model.n_embd"),
        "intermediate_size": (m.ffn_dim, "model.ffn_hidden"),
        "num_hidden_layers": (m.n_layer, "model.n_layer"),
        "num_attention_heads": (m.n_head, "model.n_head"),
        "num_key_value_heads": (m.kv_heads, "model.n_kv_head"),
        "head_dim": (m.head_dim, "model.n_embd/model.n_head"),
        "rms_norm_eps": (m.norm_eps, "model.norm_eps"),
        "attention_bias": (m.bias, "model.bias"),
        "mlp_bias": (m.bias, "model.bias"),
    }


def _rope_errors(hf_cfg: dict, m: ModelConfig) -> list[str]:
    """A config.json's RoPE (theta, scaling type and parameters) against model.rope_*."""
    try:
        theirs = rope_scaling_from_hf(hf_cfg)
    except ValueError as e:
        return [str(e)]
    return [
        f"{key}: HF {value!r} vs ours {getattr(m, key)!r} (set model.{key} to match)"
        for key, value in theirs.items()
        if value != getattr(m, key)
    ]


def check_hf_config(hf_cfg: dict, m: ModelConfig, path: str | Path) -> None:
    """Refuse a config.json that describes a computation our model (model.*) does not do,
    naming each field, its value, and what we support or which key to set."""
    where = f"model.init_from={path}"
    want_type = hf_config(m)["model_type"]
    if hf_cfg.get("model_type") != want_type:
        raise ConfigError(
            f"{where}: config.json model_type={hf_cfg.get('model_type')!r}, but model={m.name} "
            f"(style {m.style}) loads only {want_type!r} directories"
        )
    hf_cfg = dict(hf_cfg)
    errors = []
    if m.style == "llama":  # RoPE: theta and scaling, in either transformers' format
        errors += _rope_errors(hf_cfg, m)
        for k in ("rope_parameters", "rope_scaling", "rope_theta"):
            hf_cfg.pop(k, None)
    if m.style == "gpt2" and hf_cfg.get("n_inner") is None:
        hf_cfg["n_inner"] = 4 * hf_cfg.get("n_embd", m.n_embd)  # HF's default
    if m.style == "llama":
        if hf_cfg.get("num_key_value_heads") is None:
            hf_cfg["num_key_value_heads"] = hf_cfg.get("num_attention_heads", m.n_head)
        if hf_cfg.get("head_dim") is None:
            hf_cfg.pop("head_dim", None)
    ours, fixed = _model_fields(m), _FIXED[want_type]
    ignored = _IGNORED_ANY | _IGNORED[want_type] | {"model_type"}
    # A tied file loads into an untied model (the head starts as a copy); the reverse would
    # drop the file's separate output layer.
    if hf_cfg.pop("tie_word_embeddings", True) is False and m.tie_embeddings:
        errors.append(
            "tie_word_embeddings=False (a separate output layer) but model.tie_embeddings=true: "
            "set model.tie_embeddings=false"
        )
    for k, v in sorted(hf_cfg.items()):
        if k in ignored or k.startswith("_"):
            continue
        if k in fixed:
            if v not in fixed[k]:
                allowed = " or ".join(repr(x) for x in fixed[k])
                errors.append(f"{k}={v!r} is not implemented (we support {allowed})")
        elif k in ours:
            value, key = ours[k]
            if v != value:
                errors.append(f"{k}: HF {v!r} vs ours {value!r} (set {key} to match)")
        else:
            errors.append(f"{k}={v!r} is a field we do not implement (it may change the computation)")
    if errors:
        raise ConfigError(
            f"{where} does not match model={m.name}; config.json:\n  " + "\n  ".join(errors)
        )


def _check_tensors(path, m: ModelConfig, tensors: HFWeights, hf_cfg: dict, expected: dict) -> None:
    """Every tensor we need is present with our shape; nothing is left over (an extra tensor is
    a part of the computation we would drop). Shapes come from the file headers; only biases
    (for the zero check) and a tied head saved as a copy are read."""
    where = f"model.init_from={path}"
    # buffers (causal masks, RoPE frequencies) that old files saved beside the weights
    buffers = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
    need = dict(expected)
    if m.style == "gpt2" and not m.bias:
        need = {k: v for k, v in need.items() if not k.endswith(".bias")}
    if not m.tie_embeddings and hf_cfg.get("tie_word_embeddings", True):
        need.pop("lm_head.weight", None)  # tied in the file: the head is a copy of the embedding
    if m.num_labels and "score.weight" not in tensors:
        need.pop("score.weight", None)  # a language model's file: the classifier head starts fresh
        expected = {**expected, "lm_head.weight": None}  # its LM head is not ours to load
    missing = [k for k in need if k not in tensors]
    shapes = [
        f"{k}: HF {tensors.shape(k)} vs ours {tuple(v.shape)}"
        for k, v in need.items()
        if k in tensors and tensors.shape(k) != tuple(v.shape)
    ]
    extra = [k for k in tensors if k not in expected and not k.endswith(buffers)]
    if m.tie_embeddings and "lm_head.weight" in extra:
        emb = tensors.get("transformer.wte.weight")
        emb = tensors.get("model.embed_tokens.weight") if emb is None else emb
        if emb is not None and torch.equal(tensors["lm_head.weight"], emb):
            extra.remove("lm_head.weight")  # a tied head saved as a copy
    errors = [f"missing tensor {k}" for k in missing] + [f"shape of {s}" for s in shapes]
    errors += [f"extra tensor {k} (not part of model={m.name})" for k in extra]
    if m.style == "gpt2" and not m.bias:
        nonzero = [k for k in tensors if k.endswith(".bias") and k in expected and tensors[k].any()]
        if nonzero:
            errors.append(
                f"non-zero biases ({nonzero[0]} ...) but model.bias=false: set model.bias=true"
            )
    if errors:
        shown = errors[:8] + ([f"... {len(errors) - 8} more"] if len(errors) > 8 else [])
        raise ConfigError(f"{where}: the weights do not fit model={m.name}:\n  " + "\n  ".join(shown))


# (our state-dict name) -> a reader of its full tensor, called when the tensor is wanted; None
# for a classifier head that the source (a language model) does not have: it starts fresh
Readers = dict[str, Callable[[], torch.Tensor] | None]


def hf_import_readers(m: ModelConfig, path: str | Path) -> Readers:
    """Our state-dict name -> a reader of that full tensor from a local HF GPT-2 / Llama
    directory (HFWeights: each call reads one HF tensor through safe_open). Its config.json must
    describe our computation (check_hf_config) and its tensors our shapes, all named; both are
    checked here, before any tensor is read. A caller asks for one tensor at a time and places
    it where it belongs (a whole parameter, or only this rank's shard of it), so the import
    holds at most one full tensor beyond what the caller keeps."""
    hf_cfg = read_hf_config(path)
    check_hf_config(hf_cfg, m, path)
    # original GPT-2 files have no "transformer." prefix
    rename = (
        (lambda k: k if k.startswith(("transformer.", "lm_head", "score.")) else "transformer." + k)
        if m.style == "gpt2"
        else (lambda k: k)
    )
    tensors = HFWeights(path, rename)
    _check_tensors(path, m, tensors, hf_cfg, hf_meta_tensors(m))

    def one(hf: str, transpose: bool = False) -> Callable[[], torch.Tensor]:
        return lambda: tensors[hf].t() if transpose else tensors[hf]

    # GPT-2's fused c_attn feeds q, k and v, asked for one after another: the last fused
    # tensor read is kept (one slot) so the file's tensor is read once, not three times
    held: dict[str, torch.Tensor] = {}

    def part(hf: str, i: int, sizes: list[int], transpose: bool = False) -> Callable[[], torch.Tensor]:
        # Conv1D keeps (in, out): the weight is transposed
        def read() -> torch.Tensor:
            if hf not in held:
                held.clear()
                held[hf] = tensors[hf]
            t = held[hf]
            if i == len(sizes) - 1:
                held.clear()
            return (t.t() if transpose else t).split(sizes, 0)[i]

        return read

    out: Readers = {}
    if m.style == "gpt2":
        p = "transformer."
        out["tok_emb.weight"] = one(p + "wte.weight")
        out["pos_emb.weight"] = one(p + "wpe.weight")
        sizes = [m.n_embd, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim]
        for i in range(m.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            for j, n in enumerate(("wq", "wk", "wv")):
                out[f"{b}attn.{n}.weight"] = part(h + "attn.c_attn.weight", j, sizes, True)
            out[b + "attn.wo.weight"] = one(h + "attn.c_proj.weight", True)
            out[b + "mlp.w1.weight"] = one(h + "mlp.c_fc.weight", True)
            out[b + "mlp.w2.weight"] = one(h + "mlp.c_proj.weight", True)
            out[b + "attn_norm.weight"] = one(h + "ln_1.weight")
            out[b + "mlp_norm.weight"] = one(h + "ln_2.weight")
            if m.bias:
                for j, n in enumerate(("wq", "wk", "wv")):
                    out[f"{b}attn.{n}.bias"] = part(h + "attn.c_attn.bias", j, sizes)
                for ours_k, hf_k in (
                    ("attn.wo.bias", "attn.c_proj.bias"),
                    ("mlp.w1.bias", "mlp.c_fc.bias"),
                    ("mlp.w2.bias", "mlp.c_proj.bias"),
                    ("attn_norm.bias", "ln_1.bias"),
                    ("mlp_norm.bias", "ln_2.bias"),
                ):
                    out[b + ours_k] = one(h + hf_k)
        out["norm.weight"] = one(p + "ln_f.weight")
        if m.bias:
            out["norm.bias"] = one(p + "ln_f.bias")
        if m.num_labels:
            # a classifier's file; a language model's: the head starts fresh (None)
            out["lm_head.weight"] = one("score.weight") if "score.weight" in tensors else None
        elif not m.tie_embeddings:
            head = "lm_head.weight" if "lm_head.weight" in tensors else p + "wte.weight"
            out["lm_head.weight"] = one(head)
    else:
        for ours_k, hf_k in _llama_names(m):
            if hf_k == "score.weight" and hf_k not in tensors:  # an LM file: a fresh classifier head
                out[ours_k] = None
                continue
            if hf_k == "lm_head.weight" and hf_k not in tensors:  # tied in the file, untied here
                hf_k = "model.embed_tokens.weight"
            out[ours_k] = one(hf_k)
    return out


def iter_hf_weights(m: ModelConfig, path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(our state-dict name, full tensor) for every weight of model `m`, one HF tensor read at
    a time (hf_import_readers, which checks the directory first)."""
    for name, read in hf_import_readers(m, path).items():
        if read is not None:  # None: a classifier head the file does not have
            yield name, read()


def load_hf_weights(model: GPT, path: str | Path) -> set[str]:
    """Copy a local HF GPT-2 / Llama directory's weights into `model`, one tensor at a time
    (iter_hf_weights: the file's tensors are never all in memory together). Returns the names
    the directory did not provide (a classifier's head from a language model's file)."""
    sd = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, tensor in iter_hf_weights(model.cfg, path):
            sd[name].copy_(tensor)
            loaded.add(name)
    log.info("initialised %s from %s", model.cfg.name, path)
    return {n for n, _ in model.named_parameters()} - loaded


def run(cfg: ExportConfig) -> Path:
    """Export a checkpoint of any strategy, one tensor at a time (DCP reads only that
    tensor's pieces from every rank's shard files): no full model is built."""
    from framework.checkpoint import ModelTensorReader, resolve, verify

    if cfg.format != "hf":
        raise ConfigError(f"format={cfg.format!r}: only 'hf' is supported")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} must be one of {', '.join(DTYPES)}")
    parse_max_shard_size(cfg.max_shard_size)  # refuse a bad value before hashing a checkpoint
    ckpt = resolve(cfg.checkpoint)
    state = verify(ckpt)
    m = ModelConfig(**state["config"]["model"])
    reader = ModelTensorReader(ckpt / "state", m)
    tok = state["config"]["data"]["tokenizer"] if cfg.with_tokenizer else None
    labels, pad_id = None, None
    if m.num_labels:  # a classifier: its labels, and end-of-text (the padding) as pad_token_id
        from framework.data.tokenizer import load_tokenizer

        labels = state["config"].get("task", {}).get("labels")
        try:
            pad_id = load_tokenizer(state["config"]["data"]["tokenizer"]).eot_id
        except (OSError, ValueError, ImportError) as e:
            log.warning("cannot load the checkpoint's tokenizer for pad_token_id: %s", e)
    out = write_hf(
        m, reader.get, cfg.out, DTYPES[cfg.dtype], cfg.overwrite, tokenizer=tok,
        max_shard_size=cfg.max_shard_size, labels=labels, pad_id=pad_id,
    )  # fmt: skip
    log.info("wrote %s (step %d)", out, state["step"])
    return out


@entry("export", ExportConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-export`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run(to_object(dcfg, ExportConfig))
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
