"""framework.prepare in-process: every input format, the deterministic validation split, no-op
re-runs, atomic output, tokenizer training, and errors that name the pattern/file/line."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from framework.data.records import is_val
from framework.data.shards import open_shard, read_manifest
from framework.prepare import PrepareConfig, PrepareError, prepare

TEXTS = [f"document number {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(200)]


def decoded_docs(out: Path) -> list[str]:
    """All documents of a prepared byte source (train then val), as text, EOT stripped."""
    m = read_manifest(out)
    docs = []
    for split in ("train", "val"):
        for info in m.split(split):
            toks, offsets = open_shard(out / info.file, m.dtype)
            for a, b in zip(offsets[:-1], offsets[1:]):
                assert toks[b - 1] == m.eot_id
                docs.append(bytes(toks[a : b - 1].astype(np.uint8)).decode())
    return docs


def write_jsonl(path: Path, texts: list[str], opener=open) -> Path:
    with opener(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    return path


def run(tmp_path: Path, input: str, name: str = "out", **kw) -> Path:
    kw.setdefault("workers", 1)
    return prepare(PrepareConfig(input=str(input), output=str(tmp_path / name), **kw))


def zst_open(path, mode):
    return zstandard.open(path, mode)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "datasets"])
def test_every_input_format_round_trips(tmp_path, fmt):
    raw = tmp_path / "raw"
    raw.mkdir()
    half = len(TEXTS) // 2
    parts = [TEXTS[:half], TEXTS[half:]]
    if fmt.startswith("jsonl"):
        opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.zst": zst_open}[fmt]
        for i, p in enumerate(parts):
            write_jsonl(raw / f"{i}.{fmt}", p, opener)
        src = str(raw / f"*.{fmt}")
    elif fmt == "parquet":
        for i, p in enumerate(parts):
            pq.write_table(pa.table({"text": p, "n": list(range(len(p)))}), raw / f"{i}.parquet")
        src = str(raw)
    elif fmt == "txt":
        for i, t in enumerate(TEXTS):
            (raw / f"{i:04d}.txt").write_text(t)
        src = str(raw)
    else:  # a `datasets` save_to_disk directory: Arrow stream files + state.json
        for i, p in enumerate(parts):
            table = pa.table({"text": p})
            with (
                pa.OSFile(str(raw / f"data-{i:05d}-of-00002.arrow"), "wb") as f,
                pa.ipc.new_stream(f, table.schema) as w,
            ):
                w.write_table(table)
        files = [{"filename": f"data-{i:05d}-of-00002.arrow"} for i in range(2)]
        (raw / "state.json").write_text(json.dumps({"_data_files": files}))
        (raw / "dataset_info.json").write_text("{}")
        src = str(raw)
    out = run(tmp_path, src, val_fraction=0.1)
    docs = decoded_docs(out)
    assert sorted(docs) == sorted(TEXTS)
    m = read_manifest(out)
    n_val = sum(s.rows for s in m.split("val"))
    assert n_val == sum(is_val(t, 0, 0.1) for t in TEXTS) and 5 <= n_val <= 40
    assert m.meta["input"] == src and len(m.meta["files"]) == (2 if fmt != "txt" else len(TEXTS))
    assert m.tokens("train") + m.tokens("val") == sum(len(t.encode()) + 1 for t in TEXTS)


def test_workers_do_not_change_output(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 3)
    one = run(tmp_path, tmp_path / "a.jsonl", "one", workers=1, docs_per_task=17, shard_tokens=3000)
    two = run(tmp_path, tmp_path / "a.jsonl", "two", workers=2, docs_per_task=17, shard_tokens=3000)
    m1, m2 = read_manifest(one), read_manifest(two)
    assert len(m1.shards) > 2
    assert [(s.file, s.sha256) for s in m1.shards] == [(s.file, s.sha256) for s in m2.shards]


def test_rerun_is_noop_overwrite_redoes_and_other_input_refused(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    out = run(tmp_path, src)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    run(tmp_path, src)
    assert "already prepared from this input: nothing to do" in caplog.text
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    run(tmp_path, src, overwrite=True)
    assert (out / "manifest.json").stat().st_mtime_ns != mtime
    write_jsonl(tmp_path / "b.jsonl", TEXTS[:10])
    with pytest.raises(PrepareError, match=rf"output={out} holds a source prepared from other input"):
        run(tmp_path, tmp_path / "b.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]  # no temp left


def test_crash_leaves_no_half_source(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    from framework.data import shards

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shards, "write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, src, shard_tokens=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_empty_glob_missing_input_and_bad_lines_named(tmp_path):
    with pytest.raises(PrepareError, match=r"input='.*/\*\.jsonl': the pattern matched no file"):
        run(tmp_path, tmp_path / "*.jsonl")
    with pytest.raises(PrepareError, match=r"input='.*/nothing.jsonl': no such file or directory"):
        run(tmp_path, tmp_path / "nothing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(PrepareError, match=r"bad.jsonl line 2: no 'text' field"):
        run(tmp_path, tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(PrepareError, match=r"bad.jsonl line 2: not JSON"):
        run(tmp_path, tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "record, says",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "chat data (a 'messages' list): add format=chat",
        ),
        (
            {"prompt": "1+1=", "completion": "2"},
            "chat data ('prompt' and 'completion'): add format=chat",
        ),
        ({"body": "x", "label": "spam"}, None),  # no known shape: the plain message
    ],
)
def test_records_of_another_format_are_named(tmp_path, record, says):
    """Fine-tuning records read without format=: the error names the format they look like."""
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(PrepareError) as e:
        run(tmp_path, tmp_path / "in.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'in.jsonl'} line 1: no 'text' field (text_key)")
    assert (
        (f"these records look like {says}" in str(e.value))
        if says
        else ("look like" not in str(e.value))
    )


def test_labelled_records_read_as_text_warn_of_classify(tmp_path, caplog):
    """{text, label} records have a 'text': they prepare as plain text (as before), with one
    warning per file that names format=classify (the labels are not kept)."""
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS[:40])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="framework.prepare"):
        out = run(tmp_path, tmp_path / "in.jsonl")
    warned = [r.getMessage() for r in caplog.records if "look like" in r.getMessage()]
    assert warned == [
        f"{tmp_path / 'in.jsonl'}: these records look like classification data ('text' and "
        "'label'); they are read as plain text (format=text): add format=classify if that was meant"
    ]
    assert sorted(decoded_docs(out)) == sorted(TEXTS[:40])


def test_fsspec_url_input(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe_file(
            f"/raw/{i}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[i::2]).encode()
        )
    out = run(tmp_path, "memory://raw/*.jsonl")
    assert sorted(decoded_docs(out)) == sorted(TEXTS)
    assert read_manifest(out).meta["files"][0]["url"].endswith("/raw/0.jsonl")


def test_train_tokenizer_saved_used_and_fingerprinted(tmp_path):
    from framework.data.tokenizer import load_tokenizer

    src = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    out = run(tmp_path, src, train_tokenizer=300, workers=2)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    m = read_manifest(out)
    assert 257 < tok.vocab_size <= 300 and m.vocab_size == tok.vocab_size
    assert m.tokenizer_fingerprint == tok.fingerprint and m.tokenizer == str(out / "tokenizer.json")
    toks, offsets = open_shard(out / m.split("train")[0].file, m.dtype)
    first = toks[offsets[0] : offsets[1]]
    assert first[-1] == tok.eot_id
    assert tok.decode(first[:-1]) in TEXTS
    assert (
        m.tokens("train") + m.tokens("val") < sum(len(t.encode()) + 1 for t in TEXTS) / 2
    )  # BPE compresses


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz", "jsonl.zst"])
def test_truncated_input_file_named(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": TEXTS}), path)
    else:
        write_jsonl(path, TEXTS * 20, gzip.open if fmt.endswith("gz") else zst_open)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        PrepareError, match=rf"input file {path} is unreadable \(truncated or corrupt\?\)"
    ):
        run(tmp_path, path)
    assert not (tmp_path / "out").exists()


def test_conf_prepare_yaml_composes_to_the_schema():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.prepare import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("prepare", overrides=["input=raw/*.jsonl", "output=data/web", "workers=3"])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, PrepareConfig)
    assert (obj.input, obj.output, obj.workers, obj.tokenizer, obj.val_fraction) == (
        "raw/*.jsonl",
        "data/web",
        3,
        "byte",
        0.01,
    )


def test_binary_or_undecodable_txt_refused_naming_the_file(tmp_path):
    """Issue 7 failure 8: a 151 KB executable named .txt became 231,478 tokens."""
    (tmp_path / "prog.txt").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + b"hello" * 100)
    with pytest.raises(
        PrepareError, match=r"input file .*prog.txt looks binary \(a NUL byte at offset 7\)"
    ):
        run(tmp_path, tmp_path / "prog.txt")
    latin1 = ("café crème brûlée à la carte " * 50).encode("latin-1")  # 5 of 29 bytes invalid UTF-8
    (tmp_path / "latin1.txt").write_bytes(latin1)
    with pytest.raises(
        PrepareError, match=r"latin1.txt: 250 of 1450 bytes \(17.2%\) are not valid UTF-8"
    ):
        run(tmp_path, tmp_path / "latin1.txt")
    # under the 1% threshold: the stray byte becomes U+FFFD and the file is used
    (tmp_path / "ok.txt").write_bytes(b"plain text " * 20 + b"\xff")
    out = run(tmp_path, tmp_path / "ok.txt", val_fraction=0.0)
    assert decoded_docs(out) == ["plain text " * 20 + "\ufffd"]


def test_small_split_warns_with_counts(tmp_path, caplog):
    raw = write_jsonl(tmp_path / "few.jsonl", TEXTS[:40])
    with caplog.at_level(logging.WARNING, logger="framework.prepare"):
        run(tmp_path, raw, val_fraction=0.01)
    m = read_manifest(tmp_path / "out")
    train, val = m.meta["documents"]["train"], m.meta["documents"]["val"]
    assert val < 5  # 1% of 40 documents
    assert (
        f"the val split has only {val} documents (train {train}, val {val}, val_fraction=0.01)"
        in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framework.prepare"):
        run(tmp_path, raw, name="big_val", val_fraction=0.5)
    assert "split has only" not in caplog.text
