"""Datasets: every format reads the same, bad data names file/row/column, prompt labels are masked."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from madapt.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    load_examples,
    render_prompt,
    split_examples,
    tokenize_example,
)
from madapt.models import load_tokenizer

ROWS = [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "Say hi", "response": "Hi!"}]
COLUMNS = {"input_column": "prompt", "output_column": "response", "template": None}


def write(tmp_path, kind: str, rows=ROWS):
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(f'"{r[k]}"' for k in keys) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_formats_read_identically(tmp_path, kind):
    assert load_examples(write(tmp_path, kind), **COLUMNS) == [Example("What is 2+2?", "4"), Example("Say hi", "Hi!")]


def test_template_fills_columns(tmp_path):
    rows = [{"q": "2+2", "lang": "math", "a": "4"}]
    examples = load_examples(
        write(tmp_path, "jsonl", rows), input_column="q", output_column="a", template="[{lang}] {q}"
    )
    assert examples == [Example("[math] 2+2", "4")]


def test_missing_column_names_file_and_columns(tmp_path):
    path = write(tmp_path, "jsonl")
    with pytest.raises(
        DataError, match=r"d.jsonl: missing the output feature's column 'answer'; the file has \['prompt', 'response'\]"
    ):
        load_examples(path, input_column="prompt", output_column="answer", template=None)
    with pytest.raises(DataError, match=r"d.jsonl: missing column\(s\) \['lang'\] that the prompt needs"):
        load_examples(path, input_column="prompt", output_column="response", template="{prompt} in {lang}")


def test_empty_cell_names_row_and_column(tmp_path):
    path = write(tmp_path, "jsonl", [*ROWS, {"prompt": "x", "response": "  "}])
    with pytest.raises(DataError, match=r"row 3, column 'response' is empty"):
        load_examples(path, **COLUMNS)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.jsonl", "", "cannot parse|empty"),
        ("b.jsonl", '{"prompt": "a"\n', "cannot parse as json"),
        ("x.txt", "a", "unsupported"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(str(path), **COLUMNS)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_examples(str(tmp_path / "none.csv"), **COLUMNS)


def test_split_is_deterministic_and_disjoint():
    examples = [Example(f"question {i}", "a") for i in range(200)]
    train, held = split_examples(examples, 0.2)
    assert 20 < len(held) < 60 and len(train) + len(held) == 200
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert split_examples(list(reversed(examples)), 0.2)[1] == list(reversed(held))


def test_labels_mask_the_prompt():
    tokenizer = load_tokenizer("smollm2-135m")
    row = tokenize_example(tokenizer, Example("What is 2+2?", "Four."), max_length=256)
    prompt_len = len(tokenizer(render_prompt(tokenizer, "What is 2+2?"), add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert "<|im_start|>user" in render_prompt(tokenizer, "x")  # the base model's chat template is used
    batch = collate([row, tokenize_example(tokenizer, Example("Hi", "Hello"), 256)], tokenizer.pad_token_id)
    short = batch["attention_mask"][1].sum()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c"\n', "cannot parse as json"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": " "}\n', "row 2, column 'response' is empty"),
        ('{"question": "a", "answer": "b"}\n', "missing column(s)"),
    ],
)
def test_madapt_train_on_a_bad_dataset_exits_2_naming_it_and_publishes_nothing(
    tiny_model, tmp_path, capsys, content, needle
):
    import yaml

    from madapt.cli import main
    from madapt.store import AdapterStore
    from tests.helpers import tiny_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    document = tiny_config(tiny_model, str(tmp_path / "store"))
    document["adapters"]["adapters"]["chat"]["dataset"] = str(bad)
    del document["adapters"]["merge"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(document))
    assert main(["train", str(config), "--adapter", "chat"]) == 2
    message = capsys.readouterr().err
    assert "bad.jsonl" in message and needle in message
    assert AdapterStore(str(tmp_path / "store")).names() == []
