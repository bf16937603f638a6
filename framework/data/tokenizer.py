"""Tokenizers: the built-in byte-level one (no files, offline), Hugging Face `tokenizers` JSON
files, and tiktoken encodings. Each has a fingerprint written into every shard manifest so
training can refuse shards made with another tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path


class Tokenizer:
    name: str
    vocab_size: int
    eot_id: int
    fingerprint: str

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
    """A Hugging Face `tokenizers` JSON file; end-of-text is `<|endoftext|>` (added if absent
    from the file's vocabulary is an error, since the shards need a document separator)."""

    EOT = "<|endoftext|>"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self._tok = _Tok.from_file(str(p))
        eot = self._tok.token_to_id(self.EOT)
        if eot is None:
            raise ValueError(f"tokenizer {path} has no {self.EOT!r} token")
        self.name = str(p)
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "hf-" + hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str):
        import tiktoken

        self._enc = tiktoken.get_encoding(encoding)
        self.name = f"tiktoken:{encoding}"
        self.eot_id = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab
        self.fingerprint = f"tiktoken-{encoding}"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' | 'tiktoken:<encoding>' | a path to a tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.split(":", 1)[1])
    return HFTokenizer(spec)
