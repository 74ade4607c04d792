"""madapt.preference_data: Ludwig's preference shapes (prompt/chosen/rejected; prompt/response/label) from the
sources madapt reads, errors naming file, row and column, completion-only labels, collation; and the shipped
preference dataset teaching the tiny model a preference that held-out pairs show."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from madapt.config import parse_config
from madapt.data import IGNORE_INDEX, DataError, Example, encode, split_examples
from madapt.preference_data import (
    collate_kto,
    collate_pairs,
    load_preference_examples_from,
    mismatched,
    preference_rows_from_table,
    tokenize_kto,
    tokenize_pair,
)

DATA = Path(__file__).parents[1] / "examples" / "data"


def config(trainer_type: str, output: str = "chosen"):
    return parse_config(
        {
            "base_model": "x",
            "adapter": {},
            "input_features": [{"name": "prompt", "type": "text"}],
            "output_features": [{"name": output, "type": "text"}],
            "trainer": {"type": trainer_type},
        }
    )


def test_shipped_pairs_and_kto_rows_load_from_jsonl_csv_and_parquet(tmp_path):
    pairs = load_preference_examples_from(config("dpo"), str(DATA / "preferences.jsonl"))
    assert len(pairs) == 80 and pairs[0].chosen.endswith(".") and pairs[0].origin.endswith("row 1")
    kto = load_preference_examples_from(config("kto", "response"), str(DATA / "preferences_kto.jsonl"))
    assert len(kto) == 160 and sum(e.desirable for e in kto) == 80
    frame = pa.Table.from_pylist([{"prompt": "p", "response": "r", "label": "False"}]).to_pandas()
    frame.to_csv(tmp_path / "k.csv", index=False)
    (row,) = load_preference_examples_from(config("kto", "response"), str(tmp_path / "k.csv"))
    assert row.desirable is False
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b"}]), tmp_path / "d.parquet")
    (pair,) = load_preference_examples_from(config("orpo"), str(tmp_path / "d.parquet"))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("p", "a", "b")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "p", "chosen": "a"}], "missing column(s) 'rejected' (trainer.rejected_column)"),
        ([{"q": "p", "chosen": "a", "rejected": "b"}], "'prompt' (the prompt: the input feature"),
        ([{"prompt": "p", "chosen": "a", "rejected": " "}], "t.jsonl: row 1, column 'rejected' is empty"),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "", "chosen": "a", "rejected": "b"}],
            "row 2, column 'prompt' is empty",
        ),
    ],
)
def test_pair_errors_name_file_row_and_column(rows, message):
    with pytest.raises(DataError) as caught:
        preference_rows_from_table(
            pa.Table.from_pylist(rows),
            kind="dpo",
            source="t.jsonl",
            input_column="prompt",
            output_column="chosen",
            other_column="rejected",
            template=None,
        )
    assert message in str(caught.value)


def test_kto_label_errors_name_the_cell():
    table = pa.Table.from_pylist([{"prompt": "p", "response": "r", "label": "maybe"}])
    with pytest.raises(DataError, match=r"k.csv: row 1, column 'label': expected a boolean label"):
        preference_rows_from_table(
            table,
            kind="kto",
            source="k.csv",
            input_column="prompt",
            output_column="response",
            other_column="label",
            template=None,
        )


def test_conversational_rows_render_with_the_chat_template(base):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
            "chosen": [{"role": "assistant", "content": "Lima."}],
            "rejected": "Well, um, it is Lima I guess",
        }
    ]
    (pair,) = preference_rows_from_table(
        pa.Table.from_pylist(rows),
        kind="orpo",
        source="c",
        input_column="prompt",
        output_column="chosen",
        other_column="rejected",
        template=None,
    )
    assert pair.messages is not None and pair.chosen == "Lima."
    row = tokenize_pair(base.tokenizer, pair, 256)["chosen"]
    learned = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    text = base.tokenizer.decode(learned)
    assert text.startswith("Lima.") and "Capital" not in text
    assert "Be brief." in base.tokenizer.decode(row["input_ids"][: row["prompt_length"][0]])


def test_text_rows_tokenise_as_fine_tuning_rows_and_collate(base):
    pairs = load_preference_examples_from(config("dpo"), str(DATA / "preferences.jsonl"))[:3]
    tokenized = [tokenize_pair(base.tokenizer, p, 256) for p in pairs]
    ids, labels = encode(base.tokenizer, Example(pairs[0].prompt, pairs[0].chosen))
    assert (tokenized[0]["chosen"]["input_ids"], tokenized[0]["chosen"]["labels"]) == (ids, labels)
    batch = collate_pairs(tokenized, base.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["labels"][3].ne(IGNORE_INDEX).sum() == len(
        [x for x in tokenized[0]["rejected"]["labels"] if x != -100]
    )


def test_kto_collate_and_mismatched_pairs(base):
    rows = load_preference_examples_from(config("kto", "response"), str(DATA / "preferences_kto.jsonl"))[:4]
    tokenized = [tokenize_kto(base.tokenizer, r, 256) for r in rows]
    batch = collate_kto(tokenized, base.tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False]
    kl = mismatched(tokenized, 256)
    first = tokenized[0]["prompt_length"][0]
    assert kl[0]["input_ids"][:first] == tokenized[0]["input_ids"][:first]
    assert kl[0]["input_ids"][first:] == tokenized[1]["input_ids"][tokenized[1]["prompt_length"][0] :]
    with pytest.raises(ValueError, match="at least two rows"):
        mismatched(tokenized[:1], 256)


def test_split_keeps_a_prompts_rows_together():
    rows = load_preference_examples_from(config("kto", "response"), str(DATA / "preferences_kto.jsonl"))
    train, held_out = split_examples(rows, 0.2)
    assert held_out and not {r.prompt for r in train} & {r.prompt for r in held_out}
