"""The YAML schema: shipped configs validate, every bad config gets its specific error."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from madapt.cli import main
from madapt.config import SINGLE_ADAPTER_NAME, ConfigError, load_config, parse_config
from madapt.models import ModelError, resolve_base_model
from tests.helpers import LUDWIG_EXAMPLE
from tests.helpers import ludwig_example as example_doc

ROOT = Path(__file__).resolve().parents[2]


def test_ludwig_example_validates_as_written():
    config = parse_config(example_doc())
    assert list(config.named_adapters) == ["coding", "chat"]
    assert config.merge.combination_type == "ties"
    assert config.merge.density == 0.7
    assert config.merge.weights == pytest.approx([0.7, 0.3])
    assert config.active == "coding_chat"
    assert config.trust_remote_code is False


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    config = load_config(path)
    for name in config.named_adapters:
        dataset = config.dataset_for(name)
        assert dataset is None or "://" in dataset or Path(dataset).exists(), f"{path}: {name} dataset {dataset}"


def test_weights_are_normalised():
    doc = example_doc()
    doc["adapters"]["merge"]["weights"] = [3, 1]
    assert parse_config(doc).merge.weights == pytest.approx([0.75, 0.25])


def test_singular_adapter_keeps_working():
    config = parse_config({"base_model": "x", "adapter": {"type": "lora", "r": 4}})
    assert list(config.named_adapters) == [SINGLE_ADAPTER_NAME]
    assert config.active == SINGLE_ADAPTER_NAME
    assert config.merge is None


def test_dataset_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text("base_model: x\nadapter: {r: 4, dataset: data/a.csv}\n")
    assert load_config(path).dataset_for("default") == str(tmp_path / "cfg" / "data" / "a.csv")


def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
BAD = [
    ("both sections", "adapter", {"r": 4}, "adapter, adapters: mutually exclusive"),
    ("no adapters", "adapters", DELETE, "declare an adapter"),
    ("empty adapters", "adapters.adapters", {}, "adapters.adapters: Dictionary should have at least 1 item"),
    ("path traversal name", "adapters.adapters", {"../x": {"r": 4}}, "adapters.adapters.../x: invalid adapter name"),
    ("slash name", "adapters.adapters", {"a/b": {"r": 4}}, "invalid adapter name 'a/b'"),
    ("unknown key", "adapters.adapters.coding.alhpa", 3, "adapters.adapters.coding.alhpa: unknown key"),
    ("bad rank", "adapters.adapters.coding.r", 0, "adapters.adapters.coding.r: Input should be greater than"),
    ("other type", "adapters.adapters.coding.type", "ia3", "coding.r: a lora option; ia3 adapters do not take it"),
    ("bad type", "adapters.adapters.coding.type", "lorra", "coding.type: unknown adapter type 'lorra'; did you mean"),
    ("active unknown", "adapters.active", "nope", "adapters.active: 'nope' is neither an adapter nor the merge"),
    ("unknown source", "adapters.merge.sources", ["coding", "math"], "undeclared adapter(s) ['math']"),
    ("no sources", "adapters.merge.sources", [], "adapters.merge.sources: List should have at least 1 item"),
    ("weights length", "adapters.merge.weights", [1.0], "weights has 1 entries but sources has 2"),
    ("negative weights", "adapters.merge.weights", [1.0, -2.0], "weights must be non-negative"),
    ("combination", "adapters.merge.combination_type", "avg", "adapters.merge.combination_type: Input should be"),
    ("density range", "adapters.merge.density", 1.5, "adapters.merge.density: Input should be less than"),
    ("density zero", "adapters.merge.density", 0, "adapters.merge.density: Input should be greater than 0"),
    ("sign method", "adapters.merge.majority_sign_method", "most", "majority_sign_method: Input should be 'total'"),
    ("merge name clash", "adapters.merge.name", "chat", "'chat' is already an adapter name"),
    ("bad merge name", "adapters.merge.name", "a.b", "adapters.merge.name: invalid merge name"),
    ("model type", "model_type", "ecd", "model_type: Input should be 'llm'"),
    ("no base model", "base_model", DELETE, "base_model: required key is missing"),
    ("quant bits", "quantization", {"bits": 3}, "quantization.bits: Input should be 4 or 8"),
    ("strategy", "backend", {"trainer": {"strategy": "horovod"}}, "backend.trainer.strategy: Input should be"),
]


@pytest.mark.parametrize(("what", "key", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_problem(what, key, value, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(_set(example_doc(), key, value))
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_density_only_where_used():
    doc = _set(example_doc(), "adapters.merge.combination_type", "linear")
    with pytest.raises(ConfigError, match="density is only used by"):
        parse_config(doc)


def test_all_problems_reported_together():
    doc = _set(example_doc(), "adapters.active", "nope")
    doc = _set(doc, "adapters.adapters.coding.r", -1)
    doc = _set(doc, "trainer", {"epochs": 0})
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert len(caught.value.problems) == 3


def test_cli_validate_exits_2_and_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(LUDWIG_EXAMPLE.replace("alpha: 16", "alhpa: 16"))
    assert main(["validate", str(bad)]) == 2
    assert "adapters.adapters.chat.alhpa: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "expected a mapping"), ("a: [1,\n", "not valid YAML"), (b"\xff\xfe", "not UTF-8")],
)
def test_unreadable_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_base_model_and_store_are_located_from_the_config_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "models" / "mine").mkdir(parents=True)
    path = project / "c.yaml"
    doc = {"base_model": "models/mine", "adapter": {}, "storage": {"uri": "store"}}
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = load_config(path)
    assert (config.base_model, config.storage.uri) == (str(project / "models" / "mine"), str(project / "store"))

    for name, located in [
        ("models/typo", str(project / "models" / "typo")),  # beside models/: a missing directory, not a hub id
        ("./here", str(project / "here")),
        ("a/b/c", str(project / "a" / "b" / "c")),  # not shaped like a hub id
        ("org/name", "org/name"),
        ("smollm2-135m", "smollm2-135m"),
    ]:
        path.write_text(yaml.safe_dump({**doc, "base_model": name}))
        assert load_config(path).base_model == located, name
    with pytest.raises(ModelError, match=r"base_model directory .*models/typo.* does not exist"):
        resolve_base_model(str(project / "models" / "typo"))
    monkeypatch.chdir(project)
    with pytest.raises(ModelError, match=r"'models/typo' \(.*\) does not exist"):  # the same rule from here
        resolve_base_model("models/typo")


def test_validate_finds_a_broken_prompt_placeholder(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base_model": "x", "adapter": {}, "prompt": {"template": "Q: {"}}))
    assert main(["validate", str(path)]) == 2
    assert "prompt.template: broken placeholder" in capsys.readouterr().err


def test_train_refuses_a_merge_without_held_out_examples_before_training(tmp_path, capsys):
    doc = _set(example_doc() | {"dataset": "d.jsonl"}, "trainer", {"eval_fraction": 0})
    doc = _set(doc, "adapters.adapters.chat.eval_dataset", "chat_eval.jsonl")
    doc = _set(doc, "backend", {"type": "local"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 0  # held-out data may still come at train time
    capsys.readouterr()
    assert main(["train", str(path)]) == 2  # d.jsonl does not exist: refused before any data is read
    (line,) = [p for p in capsys.readouterr().err.splitlines() if "held-out" in p]
    assert "adapters.adapters.coding.eval_dataset: no held-out examples" in line  # chat has its eval_dataset
    assert main(["train", str(path), "--no-merge", "--adapter", "chat"]) == 2  # no report: on to the data
    assert "d.jsonl: dataset file not found" in capsys.readouterr().err


def test_the_alias_bomb_is_refused_at_the_real_limit_in_a_second(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 leaves
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nbase_model: x\nadapter: {}\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(path)
    assert time.perf_counter() - start < 1.0


def test_the_training_job_refuses_adapters_without_data_before_any_run(tmp_path):
    """`ray job submit -- python jobs/train.py CONFIG` reads the data its config names: none is an error
    naming each adapter, raised before Ray is touched."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", Path(__file__).parents[2] / "jobs" / "train.py")
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    path = tmp_path / "c.yaml"
    path.write_text(LUDWIG_EXAMPLE)
    with pytest.raises(ConfigError) as error:
        job.setup(str(path), None)
    assert [p.split(":")[0] for p in error.value.problems] == [
        "adapters.adapters.coding.dataset",
        "adapters.adapters.chat.dataset",
    ]
    path.write_text(LUDWIG_EXAMPLE + "\ndataset: data.jsonl\n")
    config, names, _ = job.setup(str(path), ["coding"])
    assert names == ["coding"] and config.dataset_for("coding") == str(tmp_path / "data.jsonl")
