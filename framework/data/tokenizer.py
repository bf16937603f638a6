"""Tokenizers: the built-in byte-level one (no files, offline), Hugging Face `tokenizers` JSON
files, and tiktoken encodings. Each has a fingerprint written into every shard manifest so
training can refuse shards made with another tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as _Tok


class Tokenizer:
    name: str
    vocab_size: int
    eot_id: int
    fingerprint: str
    chat_template: str | None = None
    """A Hugging Face Jinja chat template (a tokenizer directory's); None: our default template."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus end-of-text 256: vocabulary 257."""

    name = "byte"
    vocab_size = 257
    eot_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` JSON file, or a tokenizer directory (tokenizer.json beside
    tokenizer_config.json, as `save_pretrained` writes it). End-of-text is `<|endoftext|>`, or a
    directory's `eos_token`; it must be in the vocabulary, since the shards need a document
    separator. A directory's chat template (tokenizer_config.json's `chat_template`, or
    chat_template.jinja) is what task=sft data is rendered with."""

    EOT = "<|endoftext|>"

    def __init__(self, path: str):
        p = Path(path)
        eot_token = self.EOT
        if p.is_dir():
            eot_token, self.chat_template = _directory_config(p)
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        self._tok = _Tok.from_file(str(p))
        eot = self._tok.token_to_id(eot_token)
        if eot is None:
            raise ValueError(f"tokenizer {path} has no {eot_token!r} token")
        self.name = str(path)
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        h = hashlib.sha256(p.read_bytes())
        if eot_token != self.EOT:  # another document separator: other shards
            h.update(b"\0eot=" + eot_token.encode())
        self.fingerprint = "hf-" + h.hexdigest()[:16]

    # No post-processor tokens (a Llama tokenizer.json adds <s> to every encode call): documents
    # are separated by end-of-text in the shards, and chat rendering encodes turn by turn, where a
    # BOS per call would land mid-conversation. Special tokens written in the text still parse.
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def decode_token(self, i: int) -> str:
        """One token's string, special tokens included (decode drops them)."""
        return self._tok.id_to_token(int(i))


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str):
        import tiktoken  # optional (not in setup.cfg): only a tiktoken:NAME tokenizer needs it

        self._enc = tiktoken.get_encoding(encoding)
        self.name = f"tiktoken:{encoding}"
        self.eot_id = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab
        self.fingerprint = f"tiktoken-{encoding}"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def _directory_config(d: Path) -> tuple[str, str | None]:
    """(end-of-text token, chat template or None) of a Hugging Face tokenizer directory."""
    cfg_file = d / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file}: not readable JSON ({e})") from e
    eos = cfg.get("eos_token") or HFTokenizer.EOT
    eos = eos.get("content") if isinstance(eos, dict) else eos
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = d / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return str(eos), template


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' | 'tiktoken:<encoding>' | a tokenizers JSON file | a Hugging Face tokenizer
    directory (tokenizer.json + tokenizer_config.json)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.split(":", 1)[1])
    return HFTokenizer(spec)
