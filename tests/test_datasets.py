"""Every dataset shape a Ludwig user brings: CSV read as text, chat JSONL (loss on assistant turns only),
Hugging Face `datasets` directories and names (offline), DataFrames; rows cut to max_length are counted and
a row with no room for its answer is an error naming it."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from madapt.data import IGNORE_INDEX, DataError, Example, load_examples, tokenize_example, tokenize_examples
from madapt.models import load_tokenizer
from madapt.sources import read_source
from madapt.splits import load_examples_from, load_splits
from madapt.train.loop import report_truncation

COLUMNS = {"input_column": "prompt", "output_column": "response", "template": None}
ROWS = [{"prompt": "zip of Boston?", "response": "02134"}, {"prompt": "price?", "response": "1.50"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def test_csv_cells_are_read_as_text(tmp_path):
    path = tmp_path / "zips.csv"
    path.write_text("prompt,response\n02134,02134\nprice?,1.50\ntrue,007\n")
    examples = load_examples(str(path), **COLUMNS)
    assert [(e.prompt, e.response) for e in examples] == [("02134", "02134"), ("price?", "1.50"), ("true", "007")]


def test_in_memory_sources_read_like_the_file(tmp_path):
    from datasets import Dataset

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    expected = load_examples(str(path), **COLUMNS)
    for source in (pd.DataFrame(ROWS), Dataset.from_list(ROWS)):
        table = read_source(source)
        assert [(e.prompt, e.response) for e in expected] == [(r["prompt"], r["response"]) for r in table.to_pylist()]
    with pytest.raises(DataError, match="DataFrame: dataset is empty"):
        read_source(pd.DataFrame({"prompt": [], "response": []}))


def test_hugging_face_dataset_directories(tmp_path, tiny_cfg):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert [e.response for e in load_examples_from(tiny_cfg, str(tmp_path / "saved"))] == ["02134", "1.50"]
    train, held_out = load_splits(tiny_cfg, "coding", str(tmp_path / "dict"), str(tmp_path / "dict") + "")
    assert [e.prompt for e in train] == ["zip of Boston?", "price?"] and len(held_out) == 2
    assert read_source(str(tmp_path / "dict"), split="test").num_rows == 1
    with pytest.raises(DataError, match=r"dict: no split 'validation'; the dataset has \['train', 'test'\]"):
        read_source(str(tmp_path / "dict"), split="validation")


def test_an_uncached_hub_dataset_offline_is_an_error_naming_it(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as `make test` runs; the libraries read it at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"someone/not-cached-anywhere: Hugging Face dataset .* not in the local cache"):
        read_source("someone/not-cached-anywhere")
    with pytest.raises(DataError, match=r"hf://someone/x: Hugging Face dataset 'someone/x' is not in the local cache"):
        read_source("hf://someone/x")
    with pytest.raises(DataError, match=r"\./missing: dataset not found"):
        read_source("./missing")


def write_chat(tmp_path, rows) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    return str(path)


CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_chat_rows_learn_only_the_assistant_turns(tmp_path, tokenizer):
    (example,) = load_examples(write_chat(tmp_path, [CHAT]), **COLUMNS)
    row = tokenize_example(tokenizer, example, max_length=512)
    ids, labels = row["input_ids"], row["labels"]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(ids) == text  # the base's chat template, the whole conversation
    learned = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    masked = [i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    turns = [f"{m['content']}<|im_end|>\n" for m in CHAT if m["role"] == "assistant"]
    assert tokenizer.decode(learned) == "".join(turns)  # each answer and its end-of-turn marker...
    rest = text
    for turn in turns:
        rest = rest.replace(f"<|im_start|>assistant\n{turn}", "<|im_start|>assistant\n", 1)
    assert tokenizer.decode(masked) == rest  # ...and every other token (system, user, role headers) masked
    assert example.response == "Rome." and example.origin.endswith("chat.jsonl: row 1")


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "user", "content": "hi"}], "row 2, column 'messages': needs an assistant message"),
        ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "row 2, .* message 2 needs a role"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "message 2 needs a role"),
    ],
)
def test_bad_chat_rows_name_the_row(tmp_path, messages, needle):
    with pytest.raises(DataError, match=needle):
        load_examples(write_chat(tmp_path, [CHAT, messages]), **COLUMNS)


def test_rows_over_max_length_are_counted_and_reported(tokenizer, caplog):
    examples = [Example("hi", "a short answer"), Example("hello", "word " * 40), Example("hey", "ok " * 30)]
    full = [len(tokenize_example(tokenizer, e, 10_000)["input_ids"]) for e in examples]
    max_length = full[0] + 1  # the first fits, the other two are cut
    rows, truncation = tokenize_examples(tokenizer, examples, max_length)
    assert [len(r["input_ids"]) for r in rows] == [full[0], max_length, max_length]
    assert (truncation.rows, truncation.tokens) == (2, full[1] + full[2] - 2 * max_length)
    with caplog.at_level(logging.INFO, logger="madapt.train"):
        report_truncation("coding", len(rows), truncation)
    cut = f"2 longer than max_length {max_length}: {truncation.tokens} tokens cut from their ends"
    assert caplog.messages == [f"adapter 'coding': 3 rows, {cut}"]


def test_a_prompt_that_leaves_no_room_for_the_answer_names_its_row(tmp_path, tokenizer):
    path = tmp_path / "long.csv"
    path.write_text("prompt,response\nshort,yes\nfine,no\n" + "word " * 80 + ",too late\n")
    examples = load_examples(str(path), **COLUMNS)
    tokenize_examples(tokenizer, examples[:2], 64)
    no_room = r"long\.csv: row 3: the prompt takes \d+ tokens, leaving no room for the answer within max_length 64"
    with pytest.raises(DataError, match=no_room):
        tokenize_examples(tokenizer, examples, 64)
