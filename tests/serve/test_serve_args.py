"""Serve args that name the training config (`config:`): base_model, store, active and generation come from
it, with its relative paths read from its own directory; an arg given in the serve config wins. No Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from madapt.cli import main
from madapt.config import ConfigError
from madapt.serve.args import SERVE_ARGS, ServeArgs, resolve_args, sampling_defaults
from madapt.serve.local import probe_key
from tests.helpers import ROOT, ludwig_example


def training_config(directory: Path, **extra) -> Path:
    """A Ludwig-style config in `directory` whose base model and store are relative to it."""
    (directory / "models" / "mine").mkdir(parents=True)
    document = ludwig_example() | {"base_model": "models/mine", "storage": {"uri": "store"}} | extra
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_training_config_fills_what_the_args_leave_out(tmp_path, monkeypatch):
    path = training_config(tmp_path / "project", generation={"max_new_tokens": 40, "temperature": 0.3})
    monkeypatch.chdir(tmp_path)  # the training config's paths are read from its directory, not from here
    settings = resolve_args({"config": "project/train.yaml"})
    assert settings.config == str(path)
    assert settings.base_model == str(tmp_path / "project" / "models" / "mine")
    assert settings.store == str(tmp_path / "project" / "store")
    assert settings.active == "coding_chat"
    assert sampling_defaults(settings) == {"max_tokens": 40, "temperature": 0.3}

    explicit = resolve_args(
        {"config": str(path), "base_model": "smollm2-135m", "store": "s3://b/x", "active": "chat@prod",
         "generation": {"temperature": 0, "top_p": 0.5}}
    )  # fmt: skip
    assert (explicit.base_model, explicit.store, explicit.active) == ("smollm2-135m", "s3://b/x", "chat@prod")
    assert sampling_defaults(explicit) == {"max_tokens": 40, "temperature": 0.0, "top_p": 0.5}
    again = resolve_args(explicit.model_dump(mode="json"))  # what the replicas get resolves to itself
    assert again.model_dump() == explicit.model_dump()


def test_without_a_config_nothing_is_active_and_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    settings = resolve_args({"base_model": "models/missing", "store": "store"})
    assert settings.active is None and sampling_defaults(settings) == {}
    # beside a models/ folder, models/missing is a missing directory, never a hub id to download
    assert settings.base_model == str(tmp_path / "models" / "missing")
    assert settings.store == str(tmp_path / "store")
    assert resolve_args({"base_model": "org/name"}).base_model == "org/name"


def test_do_sample_false_is_greedy_and_unapplied_generation_keys_are_named(tmp_path, caplog):
    path = training_config(tmp_path, generation={"do_sample": False, "temperature": 0.7, "num_beams": 2})
    with caplog.at_level(logging.WARNING, logger="madapt.serve.args"):
        settings = resolve_args({"config": str(path)})
    assert sampling_defaults(settings) == {"temperature": 0.0}
    (line,) = [r.getMessage() for r in caplog.records if "generation." in r.getMessage()]
    assert "generation.num_beams is not applied by the server" in line


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"generation": {"max_new_tokens": 600}}, "generation.max_new_tokens: 600 is above max_tokens (512)"),
        ({"generation": {"temperature": 3}}, "generation.temperature: must be at most 2"),
        ({"generation": {"top_p": 0}}, "generation.top_p: must be above 0"),
        ({"generation": {"top_kk": 5}}, "generation.top_kk: unknown key"),
        ({"active": "../x"}, "active: invalid active adapter '../x'"),
        ({"max_tokens": 0, "store_uri": "x"}, "max_tokens: Input should be greater than or equal to 1"),
    ],
)
def test_bad_args_are_refused_naming_the_key(args, problem):
    with pytest.raises(ConfigError) as caught:
        resolve_args(args)
    assert caught.value.source == SERVE_ARGS
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_madapt_serve_names_the_serve_config_and_every_problem(tmp_path, capsys):
    document = yaml.safe_load((ROOT / "serve_configs" / "multi_adapter.yaml").read_text())
    document["applications"][0]["args"] |= {"config": str(tmp_path / "missing.yaml"), "generation": {"top_p": 0}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["serve", str(path)]) == 2  # refused before Ray starts
    assert "missing.yaml: 1 problem(s)" in capsys.readouterr().err  # the training config, by its file
    del document["applications"][0]["args"]["config"]
    path.write_text(yaml.safe_dump(document))
    assert main(["serve", str(path)]) == 2
    top_p = "applications[0].args.generation.top_p: must be above 0"
    assert f"{path}: 1 problem(s)\n  - {top_p}" in capsys.readouterr().err
    document["applications"][0]["args"] |= {"max_batch_sise": 8, "max_tokens": 0}
    path.write_text(yaml.safe_dump(document))
    assert main(["serve", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}: 2 problem(s)" in error and "applications[0].args.max_batch_sise: unknown key" in error


def test_a_broken_training_config_is_refused_with_its_problems(tmp_path):
    path = training_config(tmp_path, trainer={"epochs": 0})
    with pytest.raises(ConfigError, match=r"(?s)train\.yaml: 1 problem.*trainer\.epochs"):
        resolve_args({"config": str(path)})


def test_the_shipped_serve_config_takes_everything_from_the_demo_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    (app,) = yaml.safe_load((ROOT / "serve_configs" / "multi_adapter.yaml").read_text())["applications"]
    settings = resolve_args(app["args"])
    assert settings.config == str(ROOT / "examples" / "multi_adapter.yaml")
    assert (settings.base_model, settings.active, settings.active_for_unnamed) == ("smollm2-135m", "coding_chat", True)
    assert probe_key({"applications": [{"args": settings.model_dump()}]}) is None
    assert ServeArgs.model_validate(settings.model_dump(mode="json")) == settings
