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

Bad records are refused with the file and line (prepare writes nothing then). A conversation
longer than `max_tokens` follows `overlong`: `drop` (default; counted in the manifest's meta and
logged with file and line), `truncate` (cut to max_tokens; still counted; dropped if no trained
token remains) or `error`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from framework.data.shards import DataError
from framework.data.tokenizer import Tokenizer

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


def render(turns: list[dict], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 / uint8 arrays of one conversation under the default template."""
    ids: list[int] = []
    mask: list[int] = []
    for t in turns:
        head = tok.encode(header(t["role"]) + ("" if t["role"] == "assistant" else t["content"] + "\n"))
        ids += head
        mask += [0] * len(head)
        if t["role"] == "assistant":
            body = tok.encode(t["content"]) + [tok.eot_id]
            ids += body
            mask += [1] * len(body)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def render_prompt(prompt: str, tok: Tokenizer) -> list[int]:
    """One user turn and the assistant header: what `generate chat=true` continues."""
    return tok.encode(header("user") + prompt + "\n") + tok.encode(header("assistant"))


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
    for url, line_no, line in lines:
        if not line.strip():
            continue
        where = f"{url} line {line_no}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{where}: not JSON ({e})") from e
        turns = parse_record(raw, where)
        stats.records += 1
        ids, mask = render(turns, tok)
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
    from framework.prepare import is_val

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
