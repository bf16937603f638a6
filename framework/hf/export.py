"""Our model -> a Hugging Face directory (framework.export is the command line).

`write_hf` writes `config.json` (with our end-of-text id as bos/eos), `generation_config.json`,
the weights and the tokenizer (`tokenizer.json` + `tokenizer_config.json`) that `transformers`
loads as GPT2LMHeadModel (gpt2-style flavors), LlamaForCausalLM (llama-style), or, for a
mixture of experts, MixtralForCausalLM / OlmoeForCausalLM (framework/hf/names.py says which
and refuses, by key, what neither computes), plus AutoTokenizer: a tokenizers JSON file is copied; the built-in byte tokenizer is written as an
equivalent byte-level BPE without merges; tiktoken encodings are refused (export them with
`with_tokenizer=false`). Directory 0777 and files 0666, less the umask. A classifier
(model.num_labels > 0, task=classify) is written as GPT2ForSequenceClassification /
LlamaForSequenceClassification: our output head is their `score`, with id2label/label2id from
task.labels and pad_token_id = end-of-text, the padding our classify sources use, so HF picks the
same last text token as we do.

The export streams, for models larger than one host's memory: each HF tensor is built from a
getter (a state dict's .get, or one DCP read of a single key from the shard files of any
strategy) when its file is written, and above `max_shard_size` (HF's default 5GB) HF's sharded
layout (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) is written one file
at a time. The names and the tensor recipes are framework/hf/names.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTok

from framework.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from framework.errors import ConfigError
from framework.hf.names import INDEX, Getter, hf_config, hf_meta_tensors, hf_recipes
from framework.model import GPT, ModelConfig


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


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names (contiguous, owned copies for safetensors)."""
    sd = model.state_dict()
    return {k: f(sd.get).detach().contiguous().clone() for k, f in hf_recipes(model.cfg).items()}


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


def save_hf(model: GPT, out: str | Path, **options) -> Path:
    """Export an in-memory model; `options`: write_hf's (dtype, overwrite, tokenizer, ...)."""
    return write_hf(model.cfg, model.state_dict().get, out, **options)


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
