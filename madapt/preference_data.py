"""Preference data as Ludwig's alignment trainers read it (examples/alignment/prepare_dataset.py):

- dpo / orpo: a prompt (the input feature's column, or prompt.template's columns), the chosen completion (the
  output feature's column) and the rejected one (trainer.rejected_column, default `rejected`);
- kto: a prompt, one completion (the output feature's column; Ludwig's example calls it `response`) and a
  boolean label (trainer.kto_label_column, default `label`): true where the completion is desirable.

A prompt cell may also be a conversation, TRL's conversational shape: a list of {role, content} messages, with
the completion a string or a list holding one assistant message. Prompts are rendered exactly as madapt.data
renders a fine-tuning row (the base's chat template where it has one), so a preference-tuned adapter is served
with the prompts it was trained on. Tokenised rows carry labels on the completion tokens only (and EOS).
Every source madapt.sources reads works (CSV/JSONL/Parquet, Hugging Face datasets, DataFrames); errors name the
file, row and column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from madapt.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    encode,
    format_prompt,
    prompt_columns,
    read_turns,
    render_chat,
    render_conversation,
    truncate,
)
from madapt.sources import DatasetLike, describe, read_source

if TYPE_CHECKING:
    from madapt.config import Config

Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PreferenceExample:
    """One DPO/ORPO pair: a prompt (text, or JSON of `messages` for a conversation), its chosen and rejected
    completions."""

    prompt: str
    chosen: str
    rejected: str
    messages: Turns | None = None
    origin: str = field(default="", compare=False)


@dataclass(frozen=True)
class KtoExample:
    """One KTO row: a prompt, a completion and whether it is desirable."""

    prompt: str
    completion: str
    desirable: bool
    messages: Turns | None = None
    origin: str = field(default="", compare=False)


TRUE_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def read_label(value: Any, where: str) -> bool:
    """A KTO label: a boolean, 0/1, or the words true/false/yes/no/1/0 (a CSV cell is text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS:
        return TRUE_WORDS[value.strip().lower()]
    raise DataError(f"{where}: expected a boolean label (true/false, 1/0), got {value!r}")


def read_completion(value: Any, where: str) -> str:
    """A completion cell: text, or a list with one assistant message (TRL's conversational shape)."""
    if isinstance(value, list):
        turns = read_turns(value, where)
        if len(turns) != 1 or turns[0][0] != "assistant":
            raise DataError(f"{where}: a conversational completion is one assistant message")
        return turns[0][1]
    if value is None or not str(value).strip():
        raise DataError(f"{where} is empty")
    return str(value)


def check_preference_columns(source: str, columns: Sequence[str], needed: dict[str, str]) -> None:
    """Refuse a table that lacks a column, saying which setting names it."""
    missing = [f"{column!r} ({why})" for column, why in needed.items() if column not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) " + ", ".join(missing) + f"; the file has {list(columns)}")


def _rows(
    table: pa.Table, source: str, needed: dict[str, str], *, input_column: str, template: str | None, task: str | None
) -> list[tuple[str, Turns | None, dict[str, Any], str]]:
    """(prompt, conversation or None, the row's cells, 'source: row n') for every row."""
    conversational = input_column in table.column_names and pa.types.is_list(table.schema.field(input_column).type)
    used = [input_column] if conversational else prompt_columns(input_column=input_column, template=template, task=task)
    needed = {**dict.fromkeys(used, "the prompt: the input feature / prompt.template"), **needed}
    check_preference_columns(source, table.column_names, needed)
    out: list[tuple[str, Turns | None, dict[str, Any], str]] = []
    for index, row in enumerate(table.select(list(needed)).to_pylist(), start=1):
        origin = f"{source}: row {index}"
        if conversational:
            turns = read_turns(row[input_column] or [], f"{origin}, column {input_column!r}")
            out.append((json.dumps(turns), turns, row, origin))
            continue
        for column in used:
            if row[column] is None or not str(row[column]).strip():
                raise DataError(f"{origin}, column {column!r} is empty")
        cells = {k: str(v) for k, v in row.items() if k in used}
        try:
            prompt = format_prompt(cells, input_column=input_column, template=template, task=task)
        except ValueError as error:
            raise DataError(f"{origin}: cannot fill the prompt template: {error}") from None
        out.append((prompt, None, row, origin))
    return out


def preference_rows_from_table(
    table: pa.Table,
    *,
    kind: str,
    source: str,
    input_column: str,
    output_column: str,
    other_column: str,
    template: str | None,
    task: str | None = None,
) -> list[PreferenceExample | KtoExample]:
    """The rows a preference trainer reads. dpo/orpo: pairs of prompt, chosen (the output feature's column)
    and rejected (`other_column`: trainer.rejected_column); kto: a prompt, a completion (the output
    feature's column) and a boolean label (`other_column`: trainer.kto_label_column)."""
    kto = kind == "kto"
    output_role = "the completion: the output feature" if kto else "the chosen completion: the output feature"
    other_role = "trainer.kto_label_column" if kto else "trainer.rejected_column"
    rows = _rows(
        table,
        source,
        {output_column: output_role, other_column: other_role},
        input_column=input_column,
        template=template,
        task=task,
    )

    def example(prompt: str, turns: Turns | None, row: dict[str, Any], origin: str) -> PreferenceExample | KtoExample:
        completion = read_completion(row[output_column], f"{origin}, column {output_column!r}")
        other = f"{origin}, column {other_column!r}"
        if kto:
            return KtoExample(prompt, completion, read_label(row[other_column], other), turns, origin)
        return PreferenceExample(prompt, completion, read_completion(row[other_column], other), turns, origin)

    return [example(*found) for found in rows]


def load_preference_examples_from(config: Config, dataset: DatasetLike) -> list[PreferenceExample | KtoExample]:
    """Any dataset source as the config's trainer reads it (trainer.type dpo/orpo: pairs; kto: labelled rows)."""
    trainer = config.trainer
    if trainer.type not in ("dpo", "orpo", "kto"):
        raise ValueError(f"trainer.type {trainer.type!r} is not a preference trainer")
    return preference_rows_from_table(
        read_source(dataset),
        kind=trainer.type,
        source=describe(dataset),
        input_column=config.input_column,
        output_column=config.output_column,
        other_column=trainer.kto_label_column if trainer.type == "kto" else trainer.rejected_column,
        template=config.prompt.template,
        task=config.prompt.task,
    )


def accuracy_pairs(examples: Sequence[PreferenceExample | KtoExample]) -> list[PreferenceExample]:
    """Pairs to score preference accuracy on: the examples themselves, or for KTO each prompt's first
    desirable and first undesirable completion (prompts with only one kind are left out)."""
    pairs: list[PreferenceExample] = []
    good: dict[str, KtoExample] = {}
    bad: dict[str, KtoExample] = {}
    for example in examples:
        if isinstance(example, PreferenceExample):
            pairs.append(example)
        else:
            (good if example.desirable else bad).setdefault(example.prompt, example)
    for prompt, row in good.items():
        if prompt in bad:
            pairs.append(PreferenceExample(prompt, row.completion, bad[prompt].completion, row.messages, row.origin))
    return pairs


def encode_completion(tokenizer: Any, prompt: str, completion: str, turns: Turns | None) -> tuple[list[int], list[int]]:
    """Token ids and labels of prompt + completion, labels on the completion only: a text prompt exactly as a
    fine-tuning row (madapt.data.encode); a conversation rendered by the chat template up to the generation
    prompt, the completion being what the template writes for one more assistant turn."""
    if turns is None:
        return encode(tokenizer, Example(prompt, completion))
    messages = [{"role": role, "content": content} for role, content in turns]
    head = render_chat(tokenizer, messages)
    whole = render_conversation(tokenizer, [*messages, {"role": "assistant", "content": completion}])
    if not whole.startswith(head):
        raise DataError("the chat template does not render the completion after the prompt; cannot mask the prompt")
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(whole[len(head) :], add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def tokenize_sequence(
    tokenizer: Any, example: PreferenceExample | KtoExample, completion: str, max_length: int
) -> dict[str, list[int]]:
    """One completion of an example, cut to max_length: input_ids, labels (completion only), and prompt_length
    (the tokens before the completion, for KTO's mismatched pairs)."""
    try:
        ids, labels = encode_completion(tokenizer, example.prompt, completion, example.messages)
    except DataError as error:
        raise DataError(f"{example.origin or 'an example'}: {error}") from None
    row = truncate(Example(example.prompt, completion, origin=example.origin), ids, labels, max_length)
    prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return {**row, "prompt_length": [prompt_length]}


def tokenize_pair(tokenizer: Any, example: PreferenceExample, max_length: int) -> dict[str, dict[str, list[int]]]:
    """{'chosen': row, 'rejected': row}, each as `tokenize_sequence`."""
    return {
        "chosen": tokenize_sequence(tokenizer, example, example.chosen, max_length),
        "rejected": tokenize_sequence(tokenizer, example, example.rejected, max_length),
    }


def tokenize_kto(tokenizer: Any, example: KtoExample, max_length: int) -> dict[str, list[int]]:
    """A KTO row as `tokenize_sequence`, with `desirable` [0|1]."""
    return {
        **tokenize_sequence(tokenizer, example, example.completion, max_length),
        "desirable": [int(example.desirable)],
    }


def collate_pairs(pairs: Sequence[dict[str, dict[str, list[int]]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs as one padded batch of 2n rows, the n chosen rows first and then the n rejected, so
    one forward scores both (TRL's concatenated forward): split the log-probs with `.chunk(2)`."""
    rows = [pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs]
    return collate(rows, pad_token_id)


def collate_kto(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A padded batch of KTO rows plus `desirable` (bool, [n])."""
    batch = collate(rows, pad_token_id)
    batch["desirable"] = torch.tensor([bool(row["desirable"][0]) for row in rows], dtype=torch.bool)
    return batch


def mismatched(rows: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """KTO's KL rows: each row's prompt with the next row's completion (the batch rotated by one), whose
    log-ratio estimates KL(pi || pi_ref) in `madapt.preference.kto_kl`. Needs at least two rows."""
    if len(rows) < 2:
        raise ValueError("KTO's KL estimate needs at least two rows per batch (trainer.batch_size >= 2)")
    out = []
    for row, other in zip(rows, [*rows[1:], rows[0]], strict=True):
        head, tail = row["prompt_length"][0], other["prompt_length"][0]
        ids = row["input_ids"][:head] + other["input_ids"][tail:]
        labels = [IGNORE_INDEX] * head + other["labels"][tail:]
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            ids, labels = row["input_ids"], row["labels"]  # no room for the other completion: the row itself
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length], "prompt_length": [head]})
    return out
