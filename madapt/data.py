"""Datasets: read CSV/JSONL/Parquet with pyarrow, template prompts, tokenise, mask prompt labels.

A row is either a prompt/response pair (the config's input and output columns) or a chat in OpenAI's
`{"messages": [...]}` shape, trained with the base's chat template and a loss on assistant turns only.
The same functions format a training row and an inference prompt, so what an adapter is trained on
is exactly what it is served with. Other sources (DataFrames, Hugging Face datasets) are in sources.py.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from madapt.config import DEFAULT_TASK_TEMPLATE
from madapt.errors import UserError
from madapt.store import filesystem_for

IGNORE_INDEX = -100
READERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}


class DataError(UserError, ValueError):
    """Unusable data; the message names the file, and the row and column where there is one."""


CHAT_COLUMN = "messages"
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """A prompt and its response; for a chat row, `messages` holds the whole conversation as (role, content)
    pairs, `prompt` its turns before the last answer (JSON, for the split hash) and `response` that answer."""

    prompt: str
    response: str
    messages: tuple[tuple[str, str], ...] | None = None
    origin: str = field(default="", compare=False)
    """Where the row came from ("data.csv: row 7"), for errors found when it is tokenised."""


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
                table = read_csv_as_strings(source.read())
            elif kind == "json":
                table = pa_json.read_json(source)
            else:
                table = pq.read_table(source)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: cannot parse as {kind}: {error}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: dataset is empty")
    return table


def read_csv_as_strings(data: bytes) -> pa.Table:
    """Every CSV cell as the text it is (`02134` stays `02134`, `1.50` stays `1.50`): a prompt is text."""
    names = pa_csv.open_csv(pa.BufferReader(data)).schema.names
    options = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names})
    return pa_csv.read_csv(pa.BufferReader(data), convert_options=options)


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


def prompt_columns(*, input_column: str, template: str | None, task: str | None = None) -> list[str]:
    """The dataset columns a prompt is made of, by Ludwig's rule: a template's placeholders are dataset
    columns, whichever the input feature is; the input feature's column is read where the input itself goes
    in (no template, {__sample__}, or a template of keywords only)."""
    fields = template_fields(template if template is not None else DEFAULT_TASK_TEMPLATE if task else "")
    used = [f for f in fields if f not in (SAMPLE, TASK)]
    if not used or SAMPLE in fields or (template is None and task is None):
        used.append(input_column)
    return list(dict.fromkeys(used))


def check_columns(source: str, columns: Sequence[str], *, prompt: Sequence[str], output: str | None) -> None:
    """Refuse a table that lacks a column the prompt or the output feature needs, saying which needs it."""
    missing = [column for column in prompt if column not in columns]
    problems = []
    if missing:
        problems.append(f"column(s) {missing} that the prompt needs (prompt.template / the input feature)")
    if output is not None and output not in columns:
        problems.append(f"the output feature's column {output!r}")
    if problems:
        raise DataError(f"{source}: missing " + " and ".join(problems) + f"; the file has {list(columns)}")


def examples_from_table(
    table: pa.Table,
    *,
    source: str,
    input_column: str,
    output_column: str,
    template: str | None,
    task: str | None = None,
) -> list[Example]:
    """Turn rows into (prompt, response) pairs, checking every column and cell the config relies on; a table
    with a `messages` column and no output column holds chats."""
    if CHAT_COLUMN in table.column_names and output_column not in table.column_names:
        return chat_examples(table, source)
    used = prompt_columns(input_column=input_column, template=template, task=task)
    check_columns(source, table.column_names, prompt=used, output=output_column)
    needed = [output_column, *used]
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
        examples.append(Example(prompt=prompt, response=cells[output_column], origin=f"{source}: row {index}"))
    return examples


def read_turns(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """A cell holding a conversation: a non-empty list of {role, content} messages, as (role, content) pairs."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    turns = []
    for number, message in enumerate(value, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str) or not content.strip():
            raise DataError(
                f"{where}: message {number} needs a role ({', '.join(CHAT_ROLES)}) and non-empty text content"
            )
        turns.append((str(role), content))
    return tuple(turns)


def chat_examples(table: pa.Table, source: str) -> list[Example]:
    """Rows of OpenAI-style chats: each a list of {role, content} with at least one assistant turn to learn."""
    examples = []
    for index, messages in enumerate(table.column(CHAT_COLUMN).to_pylist(), start=1):
        where = f"{source}: row {index}, column {CHAT_COLUMN!r}"
        turns = read_turns(messages, where)
        answers = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
        if not answers or answers[0] == 0:
            raise DataError(f"{where}: needs an assistant message after the first message (nothing to learn)")
        last = answers[-1]
        prompt = json.dumps(turns[:last])
        examples.append(Example(prompt, turns[last][1], messages=turns, origin=f"{source}: row {index}"))
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


class Prompted(Protocol):
    @property
    def prompt(self) -> str: ...


Row = TypeVar("Row", bound=Prompted)


def split_examples(examples: Sequence[Row], eval_fraction: float) -> tuple[list[Row], list[Row]]:
    """Deterministic train/eval split by a hash of each prompt: stable across runs, machines and row order,
    and a prompt's rows (a preference pair, both KTO rows of one prompt) land on the same side."""
    if eval_fraction <= 0:
        return list(examples), []
    train: list[Row] = []
    held_out: list[Row] = []
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


def chat_segments(tokenizer, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """A conversation as consecutive pieces of its rendered text, each flagged True for an assistant turn
    (the answer and its end-of-turn marker), the only tokens the loss covers. Each turn is rendered with the
    chat template twice, up to the generation prompt and up to the answer's end, so the pieces are exactly
    what the template writes."""
    dicts = [{"role": role, "content": content} for role, content in messages]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt = render_chat(tokenizer, dicts[:i])
        turn = render_conversation(tokenizer, dicts[: i + 1])
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise DataError("the chat template does not render a conversation turn by turn; cannot mask its turns")
        segments += [(prompt[len(done) :], False), (turn[len(prompt) :], True)]
        done = turn
    rest = render_conversation(tokenizer, dicts)[len(done) :]
    return [*segments, (rest, False)] if rest else segments


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> str:
    """A whole conversation as the model reads it, with no generation prompt after it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels of a whole example (not yet cut to a max length); labels are IGNORE_INDEX
    except on the answer: the response and EOS, or a chat's assistant turns."""
    if example.messages is None:
        prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
        return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids
    try:
        segments = chat_segments(tokenizer, example.messages)
    except DataError as error:
        raise DataError(f"{example.origin or 'a chat example'}: {error}") from None
    ids: list[int] = []
    labels: list[int] = []
    templated = bool(getattr(tokenizer, "chat_template", None))
    for text, learned in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if learned and not templated and tokenizer.eos_token_id is not None:
            piece = [*piece, tokenizer.eos_token_id]  # without a template, EOS ends a turn
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """Token ids for prompt + response + EOS (or a chat), cut to `max_length`, with everything but the answer
    masked out of the loss. A row whose prompt leaves no room for any answer token is an error naming it."""
    return truncate(example, *encode(tokenizer, example), max_length)


def truncate(example: Example, ids: list[int], labels: list[int], max_length: int) -> dict[str, list[int]]:
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        prompt_tokens = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        raise DataError(
            f"{example.origin or 'an example'}: the prompt takes {prompt_tokens} tokens, leaving no room for the "
            f"answer within max_length {max_length}; shorten it or raise trainer.max_length "
            "(preprocessing.global_max_sequence_length)"
        )
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


@dataclass(frozen=True)
class Truncation:
    """Rows longer than max_length: how many, and how many tokens were cut from their ends."""

    rows: int = 0
    tokens: int = 0
    max_length: int = 0

    def describe(self, total: int) -> str:
        if not self.rows:
            return f"{total} rows, none longer than max_length {self.max_length}"
        return (
            f"{total} rows, {self.rows} longer than max_length {self.max_length}: "
            f"{self.tokens} tokens cut from their ends"
        )


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_length: int
) -> tuple[list[dict[str, list[int]]], Truncation]:
    """`tokenize_example` over a dataset, counting the rows cut to `max_length` and the tokens cut."""
    rows, cut_rows, cut_tokens = [], 0, 0
    for example in examples:
        ids, labels = encode(tokenizer, example)
        rows.append(truncate(example, ids, labels, max_length))
        if len(ids) > max_length:
            cut_rows, cut_tokens = cut_rows + 1, cut_tokens + len(ids) - max_length
    return rows, Truncation(cut_rows, cut_tokens, max_length)


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
