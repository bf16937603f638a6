"""Instruction (chat) data: jsonl records -> token ids and a per-token loss mask.

A record is one line of jsonl holding either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or  {"prompt": "...", "completion": "..."}   (one user turn and one assistant turn).

The default chat template (built-in tokenizers: byte, tiktoken, tokenizers JSON) renders each turn
as plain text, then ends every assistant turn with the tokenizer's end-of-text id:

    <|system|>\\n{content}\\n          (optional, not trained)
    <|user|>\\n{content}\\n            (not trained)
    <|assistant|>\\n{content}<EOT>     (header not trained; content and EOT trained)

Only assistant content and its end-of-text are trained (mask 1); `framework.generate chat=true`
renders a prompt as one user turn plus the assistant header and stops at end-of-text. Each segment
is tokenized on its own, so the ids at a turn boundary are the same at training and generation.

A Hugging Face tokenizer directory with a chat template (data.tokenizer=DIR) renders with that
template instead, through transformers' `apply_chat_template`. The mask comes from rendering the
conversation prefix by prefix: for assistant turn i, the text of turns[:i] with the generation
prompt ends where the turn's trained text starts, and the text of turns[:i+1] ends where it stops
(its content and the template's end-of-turn markup). A template that does not render prefixes as
prefixes of the whole is refused, naming the record. Generation stops at the first token of that
end-of-turn markup (e.g. `<|im_end|>`) or at end-of-text.

Bad records are refused with the file and line (prepare writes nothing then). A conversation
longer than `max_tokens` follows `overlong`: `drop` (default; counted in the manifest's meta and
logged with file and line), `truncate` (cut to max_tokens; still counted; dropped if no trained
token remains) or `error`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from framework.data.records import is_val, jsonl_records
from framework.data.tokenizer import Tokenizer
from framework.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
OVERLONG = ("drop", "truncate", "error")


class ChatError(DataError):
    """A malformed instruction record; the message names the file and line."""


def header(role: str) -> str:
    return f"<|{role}|>\n"


def parse_record(raw: object, where: str) -> list[dict]:
    """The record's turns as [{role, content}], checked; raises ChatError naming `where`."""
    if not isinstance(raw, dict):
        raise ChatError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    if "messages" in raw:
        turns = raw["messages"]
        if not isinstance(turns, list) or not turns:
            raise ChatError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    elif "prompt" in raw and "completion" in raw:
        turns = [
            {"role": "user", "content": raw["prompt"]},
            {"role": "assistant", "content": raw["completion"]},
        ]
    else:
        raise ChatError(
            f"{where}: no 'messages' field and no 'prompt'/'completion' pair (has {sorted(raw)})"
        )
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t:
            raise ChatError(f"{where}: turn {i} has no 'role' (one of {ROLES})")
        if t["role"] not in ROLES:
            raise ChatError(f"{where}: turn {i} has role {t['role']!r}, not one of {ROLES}")
        if not isinstance(t.get("content"), str):
            raise ChatError(
                f"{where}: turn {i} ({t['role']}) content is {type(t.get('content')).__name__}, "
                "not a string"
            )
        if t["role"] == "assistant" and not t["content"].strip():
            raise ChatError(f"{where}: turn {i} is an empty assistant turn (nothing to train on)")
    if turns[-1]["role"] != "assistant":
        raise ChatError(f"{where}: the last turn is {turns[-1]['role']!r}; it must be the assistant's")
    return turns


def render(turns: list[dict], tok: Tokenizer, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 / uint8 arrays of one conversation under tok's chat template."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments(turns, tok, where):
        piece = tok.encode(text) + ([tok.eot_id] if trained and tok.chat_template is None else [])
        ids += piece
        mask += [int(trained)] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def segments(turns: list[dict], tok: Tokenizer, where: str = "") -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces, each tokenized on its own."""
    if tok.chat_template is None:
        out = []
        for t in turns:
            if t["role"] == "assistant":
                out += [(header("assistant"), False), (t["content"], True)]  # + end-of-text
            else:
                out.append((header(t["role"]) + t["content"] + "\n", False))
        return out
    hf = _hf_template(tok)
    out, done = [], ""
    for i, t in enumerate(turns):
        if t["role"] != "assistant":
            continue
        before = hf.text(turns[:i], generation_prompt=True, where=where)
        after = hf.text(turns[: i + 1], generation_prompt=False, where=where)
        if not (before.startswith(done) and after.startswith(before) and len(after) > len(before)):
            raise ChatError(
                f"{where}: the chat template of {tok.name} does not render this conversation prefix "
                f"by prefix (turn {i}), so the assistant's tokens cannot be told apart; use a "
                "template that does, or data.tokenizer without a chat template (the default one)"
            )
        out += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return out


def render_prompt(prompt: str, tok: Tokenizer) -> list[int]:
    """One user turn and the assistant header: what `generate chat=true` continues."""
    user = [{"role": "user", "content": prompt}]
    if tok.chat_template is None:
        return tok.encode(header("user") + prompt + "\n") + tok.encode(header("assistant"))
    return tok.encode(_hf_template(tok).text(user, generation_prompt=True, where="the prompt"))


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant turn: end-of-text, and under a Hugging Face template the
    first token of its end-of-turn markup (what follows the content of a rendered reply)."""
    if tok.chat_template is None:
        return (tok.eot_id,)
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    trained = segments(probe, tok, "the probe conversation")[-1][0]
    end = trained[trained.rindex("a") + 1 :]
    first = tok.encode(end)[:1]
    return tuple(dict.fromkeys([*first, tok.eot_id]))


def template_name(tok: Tokenizer) -> str:
    """What the manifest records: 'default', or 'hf:' and the template's hash."""
    if tok.chat_template is None:
        return "default"
    return "hf:" + hashlib.sha256(tok.chat_template.encode()).hexdigest()[:16]


class _HFTemplate:
    """transformers' own Jinja rendering of a tokenizer directory's chat template (text only;
    tokenizing stays ours)."""

    def __init__(self, directory: str):
        # transformers (a dev extra) takes seconds to import: only a directory's HF template needs it
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(directory)

    def text(self, turns: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.hf.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # a Jinja error or the template's raise_exception(): name the record
            raise ChatError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e


_TEMPLATES: dict[str, _HFTemplate] = {}


def _hf_template(tok: Tokenizer) -> _HFTemplate:
    if tok.name not in _TEMPLATES:
        _TEMPLATES[tok.name] = _HFTemplate(tok.name)
    return _TEMPLATES[tok.name]


@dataclass
class ChatStats:
    records: int = 0
    overlong: int = 0
    """Conversations longer than max_tokens (dropped, or truncated)."""
    dropped: int = 0
    truncated: int = 0
    first_overlong: list[str] = field(default_factory=list)
    """file:line of the first few over-long records (for the log and the manifest)."""


def examples(
    lines: Iterator[tuple[str, int, str]],
    tok: Tokenizer,
    max_tokens: int | None,
    overlong: str,
    stats: ChatStats,
) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(ids, mask, rendered-text key) of every kept record from (file, line number, line text)."""
    if overlong not in OVERLONG:
        raise ChatError(f"overlong={overlong!r} must be one of {OVERLONG}")
    for where, raw in jsonl_records(lines, ChatError):
        turns = parse_record(raw, where)
        stats.records += 1
        ids, mask = render(turns, tok, where)
        if max_tokens is not None and len(ids) > max_tokens:
            stats.overlong += 1
            if overlong == "error":
                raise ChatError(
                    f"{where}: {len(ids)} tokens > max_tokens={max_tokens}; raise max_tokens or "
                    "pass overlong=drop|truncate"
                )
            if len(stats.first_overlong) < 10:
                stats.first_overlong.append(where)
            # a truncated document still ends with end-of-text (the shard convention), untrained:
            # it is no real end of the assistant's turn
            ids = np.append(ids[: max_tokens - 1], tok.eot_id)
            mask = np.append(mask[: max_tokens - 1], 0).astype(np.uint8)
            if overlong == "drop" or not mask.any():
                stats.dropped += 1
                continue
            stats.truncated += 1
        key = json.dumps(turns, sort_keys=True)
        yield ids, mask, key


def write_chat_source(lines, tok: Tokenizer, writer, max_tokens, overlong, seed, val_fraction) -> dict:
    """Render every record into `writer` (a shards.SourceWriter) with its loss mask; the split of
    a conversation is a seeded hash of its turns. Returns the counts for the manifest's meta (the
    caller closes the writer: manifest last)."""
    stats = ChatStats()
    docs = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    for ids, mask, key in examples(lines, tok, max_tokens, overlong, stats):
        split = "val" if is_val(key, seed, val_fraction) else "train"
        writer.add(split, ids, mask)
        docs[split] += 1
        tokens[split] += len(ids)
    if stats.overlong:
        log.warning(
            "%d of %d conversations longer than max_tokens=%s: %s (overlong=%s), first at %s",
            stats.overlong,
            stats.records,
            max_tokens,
            "dropped" if overlong == "drop" else f"{stats.truncated} truncated, {stats.dropped} dropped",
            overlong,
            ", ".join(stats.first_overlong[:3]),
        )
    return {
        "documents": docs,
        "tokens": tokens,
        "records": stats.records,
        "overlong": {
            "policy": overlong,
            "max_tokens": max_tokens,
            "count": stats.overlong,
            "dropped": stats.dropped,
            "truncated": stats.truncated,
            "first": stats.first_overlong,
        },
    }
