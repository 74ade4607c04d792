"""`madapt init`, the package data it copies from (examples/ and serve_configs/ inside the wheel), and the
optional dependencies: charts without matplotlib, no optional heavy import behind `import madapt.cli`."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from madapt.charts import MISSING, pyplot
from madapt.cli import main
from madapt.config import load_config
from madapt.evaluate import QualityReport, write_report
from madapt.starter import SERVE_CONFIG, TRAIN_CONFIG

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_init_writes_a_training_config_that_validates_with_its_datasets(tmp_path, capsys):
    target = tmp_path / "project"
    assert main(["init", str(target)]) == 0
    assert str(target / TRAIN_CONFIG) in capsys.readouterr().out

    config = load_config(target / TRAIN_CONFIG)
    assert list(config.named_adapters) == ["coding", "chat"]
    assert config.merge is not None and config.active == "coding_chat"
    for name, adapter in config.named_adapters.items():
        written = Path(adapter.dataset)
        assert written == target / "data" / f"{name}.jsonl"  # relative to the written config, not the repo
        assert written.read_bytes() == (ROOT / "examples" / "data" / f"{name}.jsonl").read_bytes()

    shipped = yaml.safe_load((ROOT / "serve_configs" / "multi_adapter.yaml").read_text())
    shipped["applications"][0]["args"]["config"] = str(target / TRAIN_CONFIG)  # the written training config
    assert yaml.safe_load((target / SERVE_CONFIG).read_text()) == shipped


def test_init_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    (tmp_path / SERVE_CONFIG).write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / SERVE_CONFIG).read_text() == "mine\n"
    assert not (tmp_path / TRAIN_CONFIG).exists()  # nothing is written when anything would be overwritten

    assert main(["init", "--force", str(tmp_path)]) == 0
    assert (tmp_path / SERVE_CONFIG).read_text() != "mine\n"
    load_config(tmp_path / TRAIN_CONFIG)


def test_init_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    assert main(["init", str(tmp_path / "file")]) == 2


@pytest.mark.parametrize(
    ("package", "directory", "pattern"),
    [
        ("madapt.examples", "examples", "*.yaml"),
        ("madapt.examples.data", "examples/data", "*.jsonl"),
        ("madapt.serve_configs", "serve_configs", "*.yaml"),
    ],
)
def test_repository_examples_and_serve_configs_are_package_data(package, directory, pattern):
    """The installed package (editable here, a wheel for users) reads the same files as the repository."""
    in_repo = sorted(p for p in (ROOT / directory).glob(pattern) if not p.name.startswith("_"))
    assert in_repo
    shipped = files(package)
    for path in in_repo:
        assert shipped.joinpath(path.name).read_bytes() == path.read_bytes()
    assert pattern in PYPROJECT["tool"]["setuptools"]["package-data"][package]


def test_pyproject_lists_every_package():
    """Packages are listed explicitly (find cannot see the mapped directories): a new one must be added."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "madapt").rglob("__init__.py")}
    mapped = set(PYPROJECT["tool"]["setuptools"]["package-dir"])
    assert on_disk <= listed
    assert listed - on_disk <= mapped | {"madapt.examples.data"}


def test_charts_are_skipped_with_one_log_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report = QualityReport(
        title="t", models=["base", "a"], splits=["a"], tokens={"a": 1}, losses={"base": {"a": 2.0}, "a": {"a": 1.0}}
    )
    with caplog.at_level(logging.WARNING, logger="madapt.charts"):
        json_path, png_path = write_report(report, tmp_path)
        assert pyplot(tmp_path / "x.png") is None
    assert json_path.exists() and png_path is None and not (tmp_path / "quality.png").exists()
    assert [r.getMessage().startswith(MISSING) for r in caplog.records] == [True, True]


OPTIONAL = {"matplotlib", "gguf", "deepspeed", "bitsandbytes", "boto3", "tensorboard", "mlflow"}
"""Imported only inside the functions that need them (extras), never when a madapt module loads."""


def third_party_imports() -> dict[str, dict[str, bool]]:
    """Top-level module -> {"file:line": imported at module level} for every non-stdlib import in madapt/."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted((ROOT / "madapt").rglob("*.py")):
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top == "google":  # a namespace shared by many distributions: google.cloud.storage, google.api_core
                    top = ".".join(name.split(".")[: 3 if name.startswith("google.cloud.") else 2])
                if top not in sys.stdlib_module_names and top != "madapt":
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault(top, {})[where] = id(node) in module_level
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_is_declared_and_optional_ones_are_lazy():
    project = PYPROJECT["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}
    distributions = packages_distributions()
    for module, places in third_party_imports().items():
        names = {normalise(d) for d in distributions.get(module, [module])}  # google.api_core -> google-api-core
        assert names & declared, f"{module} ({sorted(places)}) is imported but not declared in pyproject.toml"
        if module in OPTIONAL:
            eager = [where for where, top in places.items() if top]
            assert not eager, f"optional {module} imported at module level: {eager}"


def test_cli_import_loads_no_optional_dependency():
    """bitsandbytes and boto3 are left out: peft and accelerate import them themselves when installed."""
    optional = ["matplotlib", "gguf", "deepspeed"]
    code = f"import sys, madapt.cli; print([m for m in {optional!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]"


def test_the_demo_outside_a_checkout_uses_a_starter_project(tmp_path, monkeypatch):
    from madapt.demo import demo_files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MADAPT_HOME", str(tmp_path / "home"))
    config, serve = demo_files(None)
    assert Path(config).parent == Path(serve).parent == tmp_path / "home" / "demo"
    assert load_config(config).dataset_for("coding") == str(tmp_path / "home" / "demo" / "data" / "coding.jsonl")
    monkeypatch.chdir(ROOT)
    assert demo_files(None) == ("examples/multi_adapter.yaml", "serve_configs/multi_adapter.yaml")
