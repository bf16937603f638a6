"""Which data a run trains on, stored in each checkpoint and compared on resume (RELIABILITY A11).

The loader state is a position in a sample order that is a pure function of the manifests, the
tokenizer, seq_len and the mixture; a resume on other data would continue a different sequence
without any error. So the checkpoint records:
- per source (by name): a fingerprint of its manifest's shard list (file, split, rows, tokens,
  bytes, sha256) and, for the message only, its path: two swapped paths show as two changed
  fingerprints, while moving a prepared directory elsewhere changes nothing;
- the tokenizer fingerprint, seq_len, every source's weight and the schedule;
- data.attend_across_documents (how packed documents see each other: a resume must keep the
  attention the run was trained with). A checkpoint from before that key recorded
  data.doc_mask in its config instead (`with_legacy_attention`).
A resume with any of them changed is refused (CheckpointError naming each change, old vs new)
unless data.allow_change_on_resume=true: then each change is logged as a WARNING and the loader
keeps each source's window position by name (MixtureLoader.load_state_dict).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from framework.data.shards import Manifest
from framework.errors import CheckpointError

log = logging.getLogger("framework")


def manifest_fingerprint(m: Manifest) -> str:
    """sha256 of the manifest's shard list: content identity, whoever wrote the file and where."""
    shards = sorted((s.split, s.file, s.rows, s.tokens, s.bytes, s.sha256) for s in m.shards)
    return hashlib.sha256(json.dumps([m.dtype, shards]).encode()).hexdigest()


def data_identity(loader, tokenizer_fingerprint: str) -> dict:
    """The identity of the data a MixtureLoader reads (stored in trainer.json under "data")."""
    cfg = loader.cfg
    return {
        "sources": {
            s.name: {"fingerprint": manifest_fingerprint(p.manifest), "path": str(s.path)}
            for s, p in zip(loader.sources, loader.packed)
        },
        "tokenizer": tokenizer_fingerprint,
        "seq_len": loader.seq_len,
        "attend_across_documents": cfg.attend_across_documents,
        "weights": {s.name: float(s.weight) for s in cfg.sources},
        "schedule": [
            {"step": e.step, "weights": {k: float(w) for k, w in sorted(e.weights.items())}}
            for e in sorted(cfg.schedule, key=lambda e: e.step)
        ],
    }


def data_changes(saved: dict, now: dict) -> list[str]:
    """One line per difference between two data identities, naming the source or key."""
    out = []
    old_src, new_src = saved.get("sources", {}), now["sources"]
    for name in sorted(set(old_src) | set(new_src)):
        a, b = old_src.get(name), new_src.get(name)
        if a is None:
            out.append(f"source {name!r}: new ({b['path']}), not in the checkpoint")
        elif b is None:
            out.append(f"source {name!r}: in the checkpoint ({a['path']}), not in this config")
        elif a["fingerprint"] != b["fingerprint"]:
            out.append(
                f"source {name!r}: manifest fingerprint {a['fingerprint'][:16]} ({a['path']}) in the "
                f"checkpoint vs {b['fingerprint'][:16]} ({b['path']}) now"
            )
    for key, label in (("tokenizer", "data.tokenizer"), ("seq_len", "trainer.seq_len")):
        if saved.get(key) != now[key]:
            out.append(f"{label}: {saved.get(key)!r} in the checkpoint vs {now[key]!r} now")
    old_w, new_w = saved.get("weights", {}), now["weights"]
    for name in sorted(set(old_w) | set(new_w)):
        if old_w.get(name) != new_w.get(name):
            out.append(
                f"source {name!r} weight: {old_w.get(name)} in the checkpoint vs {new_w.get(name)} now"
            )
    if saved.get("attend_across_documents") != now["attend_across_documents"]:
        was = saved.get("attend_across_documents")
        legacy = f" (data.doc_mask={not was} before the key existed)" if saved.get("legacy") else ""
        out.append(
            f"data.attend_across_documents: {was}{legacy} in the checkpoint vs "
            f"{now['attend_across_documents']} now (set data.attend_across_documents={was} to "
            "keep the attention the run was trained with)"
        )
    if saved.get("schedule", []) != now["schedule"]:
        out.append(f"data.schedule: {saved.get('schedule')} in the checkpoint vs {now['schedule']} now")
    return out


def with_legacy_attention(identity: dict | None, config: dict | None) -> dict | None:
    """A checkpoint's data identity with attend_across_documents filled in when it was written
    before the key existed: its config's data.doc_mask said the same thing the other way round
    (doc_mask=false, the old default: attention across documents). A doc_mask=true run (sft)
    masked documents but kept positions running through the window: under masking, positions
    now restart at each document, which RoPE models do not see (attention scores depend on
    relative positions only) and learned-position (gpt2) models do: logged as a WARNING."""
    if identity is None or "attend_across_documents" in identity:
        return identity
    doc_mask = bool(((config or {}).get("data") or {}).get("doc_mask", False))
    if doc_mask and ((config or {}).get("model") or {}).get("style") == "gpt2":
        log.warning(
            "this checkpoint was trained with data.doc_mask=true, before positions restarted at "
            "each document: its learned position embeddings now see per-document positions"
        )
    return {**identity, "attend_across_documents": not doc_mask, "legacy": True}


def check_data_resume(saved: dict | None, now: dict, allow_change: bool, checkpoint: Path) -> None:
    """Refuse (CheckpointError) a resume whose data differs from the checkpoint's, unless
    data.allow_change_on_resume=true, which logs each change as a WARNING."""
    if saved is None:
        log.warning(
            "%s records no data identity (written before it was stored): changed data cannot be "
            "detected on this resume",
            checkpoint,
        )
        return
    changes = data_changes(saved, now)
    if not changes:
        return
    lines = "\n  ".join(changes)
    if not allow_change:
        raise CheckpointError(
            f"{checkpoint} was written on other data:\n  {lines}\nRestore the data config, or set "
            "data.allow_change_on_resume=true to continue on this data (each source keeps its "
            "position by name; a new source starts at its beginning)"
        )
    log.warning(
        "resuming %s on changed data (data.allow_change_on_resume=true):\n  %s", checkpoint, lines
    )
