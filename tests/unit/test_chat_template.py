"""Instruction data rendered with a Hugging Face tokenizer directory's own chat template (issue 11
item 1): the trained tokens are exactly each assistant turn's content and end-of-turn markup, the
ids equal the tokens of transformers' rendering, generation's prompt is the prefix training saw,
generation stops at the template's end of turn, and a template that does not render prefixes as
prefixes is refused naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from framework.data.chat import ChatError, render, render_prompt, segments, stop_ids, template_name
from framework.data.shards import read_manifest
from framework.data.tokenizer import HFTokenizer, load_tokenizer
from framework.prepare import PrepareConfig, prepare, train_bpe

# ChatML, as Qwen and others ship it (written here, not copied from any tokenizer)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# renders the number of messages first: a prefix of the conversation is no prefix of the whole
COUNTING = "{{ messages|length }}:" + CHATML
TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "add: 2+3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "add: 10+7"},
    {"role": "assistant", "content": "17"},
]


def tokenizer_dir(root: Path, template: str | None = CHATML, eos: str = HFTokenizer.EOT) -> Path:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok

    root.mkdir(parents=True, exist_ok=True)
    train_bpe(iter(["add: 2+3 = 5, be brief, user assistant system"] * 20), 300, root / "tokenizer.json")
    tok = HFTok.from_file(str(root / "tokenizer.json"))
    tok.add_special_tokens(
        [AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)]
    )
    tok.save(str(root / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if template is not None:
        cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return load_tokenizer(str(tokenizer_dir(tmp_path_factory.mktemp("tok"))))


def test_directory_tokenizer_is_the_file_tokenizer_plus_its_template(chatml, tmp_path):
    plain = load_tokenizer(str(Path(chatml.name) / "tokenizer.json"))
    assert chatml.chat_template == CHATML and plain.chat_template is None
    assert chatml.fingerprint == plain.fingerprint and chatml.eot_id == plain.eot_id
    other = load_tokenizer(str(tokenizer_dir(tmp_path / "eos", eos="<|im_end|>")))
    assert other.eot_id == plain.encode("<|im_end|>")[0] and other.fingerprint != plain.fingerprint


def test_trained_tokens_are_assistant_content_and_end_of_turn(chatml):
    from transformers import AutoTokenizer

    ids, mask = render(TURNS, chatml)
    text = AutoTokenizer.from_pretrained(chatml.name).apply_chat_template(TURNS, tokenize=False)

    def raw(x):  # with the special tokens (decode drops them)
        return chatml._tok.decode(list(x), skip_special_tokens=False)

    assert raw(ids) == text  # the template's rendering, nothing added
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    runs += [cur] if cur else []
    assert [raw(r) for r in runs] == ["5<|im_end|>\n", "17<|im_end|>\n"]


def test_generation_prompt_is_the_prefix_training_saw(chatml):
    turns = [{"role": "user", "content": "add: 2+3"}, {"role": "assistant", "content": "5"}]
    ids, mask = render(turns, chatml)
    prompt = render_prompt("add: 2+3", chatml)
    first_trained = int(np.argmax(mask))
    assert ids[:first_trained].tolist() == prompt
    end = chatml.encode("<|im_end|>")
    assert len(end) == 1 and stop_ids(chatml) == (end[0], chatml.eot_id)


def test_template_that_is_not_prefix_stable_is_refused_naming_the_record(tmp_path):
    tok = load_tokenizer(str(tokenizer_dir(tmp_path / "count", template=COUNTING)))
    with pytest.raises(ChatError, match=r"chat.jsonl line 3: .*prefix by prefix \(turn 2\)"):
        segments(TURNS, tok, "chat.jsonl line 3")


def test_prepare_records_the_template_and_trains_only_the_replies(chatml, tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": TURNS}) + "\n" for _ in range(3)))
    cfg = PrepareConfig(input=str(src), output=str(tmp_path / "out"), format="chat", workers=1,
                        tokenizer=chatml.name, val_fraction=0.0)  # fmt: skip
    m = read_manifest(prepare(cfg))
    assert m.meta["template"] == template_name(chatml) and m.meta["template"].startswith("hf:")
    assert m.tokenizer_fingerprint == chatml.fingerprint
    replies = len(chatml.encode("5<|im_end|>\n")) + len(chatml.encode("17<|im_end|>\n"))
    assert m.trained_tokens == {"train": 3 * replies, "val": 0}
    assert template_name(load_tokenizer("byte")) == "default"


def test_hf_export_carries_the_template_and_end_of_turn(chatml, tmp_path):
    from transformers import AutoTokenizer

    from framework.hf.export import write_tokenizer
    from tests.helpers import make_cfg

    out = tmp_path / "hf"
    out.mkdir()
    assert write_tokenizer(chatml.name, out, make_cfg(["model.vocab_size=512"]).model) == chatml.eot_id
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == HFTokenizer.EOT and hf.eos_token_id == chatml.eot_id
    assert hf.chat_template == CHATML
    text = hf.apply_chat_template(TURNS[:2], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert hf.encode(text, add_special_tokens=False) == chatml.encode(text)
