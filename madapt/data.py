"""Datasets: read CSV/JSONL/Parquet with pyarrow, template prompts, tokenise, mask prompt labels.

The same functions format a training row and an inference prompt, so what an adapter is trained on
is exactly what it is served with.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from madapt.config import DEFAULT_TASK_TEMPLATE
from madapt.store import filesystem_for

IGNORE_INDEX = -100
READERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Unusable data; the message names the file, and the row and column where there is one."""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


def read_table(path: str) -> pa.Table:
    """Read a dataset file into an Arrow table, refusing unknown formats and empty files."""
    suffix = Path(path).suffix.lower()
    kind = READERS.get(suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported dataset format {suffix!r}; use one of {sorted(READERS)}")
    fs, location = filesystem_for(path)  # a local path, or file://, s3://, gs:// as the store reads them
    try:
        found = fs.get_file_info(location).type == pafs.FileType.File
    except OSError as error:
        raise DataError(f"{path}: cannot reach the dataset: {error}") from None
    if not found:
        raise DataError(f"{path}: dataset file not found")
    try:
        with fs.open_input_file(location) as source:
            if kind == "csv":
                table = pa_csv.read_csv(source)
            elif kind == "json":
                table = pa_json.read_json(source)
            else:
                table = pq.read_table(source)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: cannot parse as {kind}: {error}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: dataset is empty")
    return table


SAMPLE, TASK = "__sample__", "__task__"
"""Ludwig's template keywords: the input as Ludwig quotes it, and prompt.task."""


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def format_prompt(cells: dict[str, str], *, input_column: str, template: str | None, task: str | None = None) -> str:
    """A row's prompt as Ludwig formats it (ludwig/data/prompt.py): the input as is without template or task;
    with a task and no template, Ludwig's zero-shot template; {__sample__} is the input JSON-quoted and
    stripped of its outer quotes, {__task__} the task, {column:.2f} a float-formatted column."""
    if template is None and task is None:
        return cells[input_column]
    template = template if template is not None else DEFAULT_TASK_TEMPLATE
    values: dict[str, object] = {}
    for _, name, spec, _ in string.Formatter().parse(template):
        if not name:
            continue
        if name == SAMPLE:
            values[name] = json.dumps(cells[input_column], indent=2).strip('"')
        elif name == TASK:
            values[name] = task or ""
        else:
            values[name] = float(cells[name]) if spec and "f" in spec else cells[name]
    return template.format(**values)


def examples_from_table(
    table: pa.Table,
    *,
    source: str,
    input_column: str,
    output_column: str,
    template: str | None,
    task: str | None = None,
) -> list[Example]:
    """Turn rows into (prompt, response) pairs, checking every column and cell the config relies on."""
    fields = template_fields(template if template is not None else DEFAULT_TASK_TEMPLATE if task else "")
    used = [f for f in fields if f not in (SAMPLE, TASK)]
    if not used or SAMPLE in fields or (template is None and task is None):
        used.append(input_column)
    needed = [output_column, *used]
    missing = [c for c in dict.fromkeys(needed) if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the file has {table.column_names}")
    rows = table.select(list(dict.fromkeys(needed))).to_pylist()
    examples = []
    for index, row in enumerate(rows, start=1):
        for column, value in row.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{source}: row {index}, column {column!r} is empty")
        cells = {k: str(v) for k, v in row.items()}
        try:
            prompt = format_prompt(cells, input_column=input_column, template=template, task=task)
        except ValueError as error:
            raise DataError(f"{source}: row {index}: cannot fill the prompt template: {error}") from None
        examples.append(Example(prompt=prompt, response=cells[output_column]))
    return examples


def load_examples(
    path: str, *, input_column: str, output_column: str, template: str | None, task: str | None = None
) -> list[Example]:
    return examples_from_table(
        read_table(path),
        source=path,
        input_column=input_column,
        output_column=output_column,
        template=template,
        task=task,
    )


def split_examples(examples: Sequence[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic train/eval split by a hash of each prompt: stable across runs, machines and row order."""
    if eval_fraction <= 0:
        return list(examples), []
    train: list[Example] = []
    held_out: list[Example] = []
    for example in examples:
        bucket = int.from_bytes(hashlib.sha256(example.prompt.encode()).digest()[:4], "big") / 2**32
        (held_out if bucket < eval_fraction else train).append(example)
    if not train:
        train, held_out = held_out, []
    return train, held_out


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """Token ids for prompt + response + EOS, with the prompt's labels masked out of the loss."""
    prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked from attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
