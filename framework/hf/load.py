"""A Hugging Face directory -> readers of our model's tensors (model.init_from=<dir>).

`hf_import_readers` checks a local HF GPT-2 / Llama / Mixtral / OLMoE directory against our model config before any
tensor is read: its config.json must describe our computation (`check_hf_config`: every field
known, each value one we implement) and its tensors our shapes (`_check_tensors`), all named in
one refusal. It then returns, per state-dict name of ours, a reader of that one full tensor
(safetensors' safe_open, or a memory-mapped pytorch_model.bin): the meta build writes each
straight into each rank's shard (framework/parallel/materialize.py), so an import holds at most
one full tensor beyond what the caller keeps. The names are framework/hf/names.py's, read
backwards (split, transposed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors  # safetensors.safe_open looked up per call: a test counts the reads
import torch

from framework.errors import ConfigError
from framework.hf.names import (
    INDEX,
    config_fields,
    embedding_name,
    hf_config,
    hf_meta_tensors,
    links,
    out_features,
)
from framework.model import GPT, ModelConfig
from framework.model.rope import rope_scaling_from_hf

log = logging.getLogger("framework")


class HFWeights:
    """The tensors of a local HF directory, read one at a time: `model.safetensors.index.json`
    and its shards, else every `*.safetensors`, else `pytorch_model.bin` (memory-mapped,
    weights_only). Names and shapes come from the headers; a tensor is read when asked for.
    `rename` maps a file's names to the ones we look up (original GPT-2 files lack the
    "transformer." prefix)."""

    def __init__(self, path: str | Path, rename: Callable[[str], str] = lambda k: k):
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
                with safetensors.safe_open(str(d / name), framework="pt") as f:  # reads the header only
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
        file, key, _ = self._names[name]
        if self._bin is not None:
            return self._bin[key]
        # A file opened per read, not kept open: a kept handle keeps the pages it mapped
        # resident, so host memory would grow to the whole checkpoint while loading.
        with safetensors.safe_open(str(self._dir / file), framework="pt") as f:
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
    # the load-balancing loss and router noise are training choices (ours: model.moe.*)
    "mixtral": {"attention_dropout", "max_position_embeddings", "router_aux_loss_coef",
                "output_router_logits", "router_jitter_noise"},
    "olmoe": {"attention_dropout", "max_position_embeddings", "router_aux_loss_coef",
              "output_router_logits"},
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
    "mixtral": {"hidden_act": ("silu",), "sliding_window": (None,)},
    "olmoe": {"hidden_act": ("silu",), "clip_qkv": (None,)},
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
    ours, fixed = config_fields(m), _FIXED[want_type]
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
    experts: dict[str, list[str]] = {}  # our stacked tensor -> its HF tensors, expert order
    for link in links(m):
        if link.expert is not None:
            experts.setdefault(link.ours[0], []).append(link.hf)
            continue
        if link.always and not m.bias:  # HF GPT-2's biases: zeros in the file, none in our model
            continue
        if link.ours == ("lm_head.weight",):
            if m.num_labels:  # a classifier's file; a language model's: the head starts fresh (None)
                out["lm_head.weight"] = one("score.weight") if "score.weight" in tensors else None
            else:  # tied in the file, untied here: the head starts as a copy of the embedding
                head = "lm_head.weight" if "lm_head.weight" in tensors else embedding_name(m)
                out["lm_head.weight"] = one(head)
        elif len(link.ours) == 1:
            out[link.ours[0]] = one(link.hf, link.transpose)
        else:
            sizes = [out_features(m, k) for k in link.ours]
            for i, ours in enumerate(link.ours):
                out[ours] = part(link.hf, i, sizes, link.transpose)
    for ours, names in experts.items():  # (E, ...) from E files' tensors: one full tensor held
        out[ours] = lambda names=names: torch.stack([tensors[k] for k in names])
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
