"""Ludwig's habits: `madapt train model.yaml --dataset data.csv` and `madapt.Model(config).train(dataset=df)`
on a Ludwig-style config (singular adapter, scheduler, prompt template), then predict; one code path.
Local backend on the tiny model, a few optimizer steps each."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import yaml

import madapt
from madapt.cli import main
from madapt.store import AdapterStore

ROWS = [{"question": f"zip code of district {i}?", "answer": f"0{2134 + i}", "city": "Boston"} for i in range(12)] + [
    {"question": "spell it out", "answer": "one two three four five " * 8, "city": "Boston"}
]


def ludwig_config(tiny_model: str) -> dict:
    """As Ludwig's README writes an LLM fine-tune: no dataset, no store (MADAPT_STORE gives that)."""
    return {
        "model_type": "llm",
        "base_model": tiny_model,
        "input_features": [{"name": "question", "type": "text"}],
        "output_features": [{"name": "answer", "type": "text"}],
        "prompt": {"template": "Answer with a zip code. Q: {question}"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "trainer": {
            "type": "finetune",
            "train_steps": 2,
            "batch_size": 2,
            "learning_rate": 0.05,
            "learning_rate_scheduler": {"decay": "cosine", "warmup_fraction": 0.5},
        },
        "preprocessing": {"global_max_sequence_length": 64},
        "backend": {"type": "local"},
    }


@pytest.fixture
def project(tiny_model, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("MADAPT_STORE", str(store))
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(ludwig_config(tiny_model)))
    data = tmp_path / "data.csv"
    pd.DataFrame(ROWS).to_csv(data, index=False)
    return config, data, AdapterStore(str(store))


def test_madapt_train_with_dataset_trains_publishes_and_predicts(project, tmp_path, capsys, caplog):
    config, data, store = project
    with caplog.at_level(logging.INFO, logger="madapt.train"):
        assert main(["train", str(config), "--dataset", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "published default@1: loss" in out
    manifest = store.manifest("default")
    assert manifest.metrics["steps"] == 2 and manifest.metrics["truncated_rows"] == 1  # the long answer is cut
    cut = manifest.metrics["truncated_tokens"]
    assert f"max_length cut 1 row(s) by {cut} tokens" in out  # in the summary, and at train start:
    assert [m for m in caplog.messages if m.startswith("adapter 'default'")] == [
        f"adapter 'default': {len(ROWS) - 1} rows, 1 longer than max_length 64: {cut} tokens cut from their ends"
    ]
    losses = manifest.metrics["losses"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)

    assert main(["predict", str(config), "zip code of district 3?", "--max-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[default] zip code of district 3?" and lines[1].startswith("  -> ")
    model = madapt.Model(str(config))
    table = model.predict(["zip code of district 3?"], max_new_tokens=4)
    assert lines[1] == f"  -> {table['answer_response'][0]}"  # the CLI prints what Model.predict returns

    # every row of a dataset, with each adapter: its columns as read, the adapter, Ludwig's prediction column
    output = tmp_path / "out" / "predictions.jsonl"
    command = ["predict", str(config), "--dataset", str(data), "--output", str(output), "--max-tokens", "4"]
    assert main([*command, "--adapter", "default", "--adapter", "base"]) == 0
    assert capsys.readouterr().out == f"wrote {2 * len(ROWS)} prediction(s) to {output}\n"
    written = pd.read_json(output, lines=True, dtype=False)
    assert list(written.columns) == ["question", "answer", "city", "adapter", "answer_response"]
    assert written["question"].tolist() == [row["question"] for row in ROWS] * 2
    assert written["answer"][0] == "02134" and written["adapter"].tolist() == ["default"] * 13 + ["base"] * 13
    assert written["answer_response"][3] == table["answer_response"][0]  # the row of district 3, as predicted above
    assert main(["predict", str(config), "a prompt", "--dataset", str(data)]) == 2
    assert "give prompts or --dataset PATH, not both" in capsys.readouterr().err

    assert main(["train", str(config), "--quiet"]) == 2  # no --dataset, and the config names none
    err = capsys.readouterr().err
    assert "adapter.dataset: adapter 'default' has no training data" in err and "--dataset FILE" in err


def test_model_api_trains_on_a_dataframe_evaluates_and_predicts(project, tiny_model):
    *_, store = project
    frame = pd.DataFrame(ROWS)
    model = madapt.Model(ludwig_config(tiny_model))
    manifests = model.train(dataset=frame.iloc[:10], eval_dataset=frame.iloc[10:12], progress=False)
    assert list(manifests) == ["default"] and manifests["default"].ref == "default@1"
    assert manifests["default"].metrics["steps"] == 2

    report = model.evaluate()  # held out: the eval_dataset given to train
    assert report.splits == ["default"] and report.tokens["default"] > 0
    assert report.losses["default@1"]["default"] != report.losses["base"]["default"]
    on_frame = model.evaluate(frame.iloc[:4])
    assert on_frame.splits == ["DataFrame"] and on_frame.tokens["DataFrame"] > report.tokens["default"]

    prompts = ["zip code of district 1?", "zip code of district 2?"]
    table = model.predict(prompts, adapter=["default", "base"], max_new_tokens=3)
    assert list(table.columns) == ["question", "adapter", "answer_response"]
    assert list(table["adapter"]) == ["default", "default", "base", "base"]
    assert list(table["question"]) == prompts * 2
    assert model.predict(frame.iloc[1:3], max_new_tokens=3)["answer_response"].tolist() == (
        table["answer_response"][:2].tolist()
    )  # a dataset's input column predicts as the same prompts
    uneven = [prompts[0], "what is the zip code of district 12 of the city, the one north of the river?"]
    alone = model.predict(uneven, max_new_tokens=3, batch_size=1)["answer_response"].tolist()
    assert model.predict(uneven, max_new_tokens=3, batch_size=2)["answer_response"].tolist() == alone  # padded left

    loaded = madapt.Model.load(store.uri)  # the store alone: its base, its adapters
    assert loaded.config.base_model == tiny_model and loaded.config.active == "default"
    again = loaded.predict(f"Answer with a zip code. Q: {prompts[0]}", adapter="default", max_new_tokens=3)
    assert again["response_response"][0] == table["answer_response"][0]  # no template there: the prompt as trained


def test_one_dataset_for_several_adapters_is_refused_naming_them(tiny_model, tmp_path, capsys):
    from tests.helpers import tiny_config

    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model, str(tmp_path / "store")), sort_keys=False))
    assert main(["train", str(config), "--dataset", "data.csv"]) == 2
    assert "dataset: one dataset for adapters ['coding', 'chat']: name the adapter" in capsys.readouterr().err
    model = madapt.Model(str(config))
    with pytest.raises(madapt.api.ConfigError, match=r"dataset: adapter 'nope' is not declared"):
        model.train(dataset={"nope": "x.csv"})
    assert main(["train", str(config), "--dataset", "missing.csv", "--adapter", "chat"]) == 2
    assert "missing.csv: dataset file not found" in capsys.readouterr().err
    assert AdapterStore(str(tmp_path / "store")).list() == []
