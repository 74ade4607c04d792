"""The commands a user runs first answer at once: `madapt --help`, `madapt validate` (Ludwig configs with
other adapter types included), `madapt plan` and `madapt adapters list` load none of torch, transformers, PEFT
or Ray; nor does `import madapt.config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from madapt.bench.cli import HEAVY, loaded_modules

CORPUS = Path(__file__).parent / "config" / "ludwig_corpus"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["validate", "examples/multi_adapter.yaml"],
        ["validate", str(CORPUS / "readme_alpaca_qlora.yaml")],
        ["validate", str(CORPUS / "check_two_input_features.yaml")],  # a refusal, exit 2
        ["plan", "examples/multi_adapter.yaml"],
        ["plan", "--base-model", "gpt-9"],  # an unknown model, exit 2
        ["adapters", "list", "--config", "examples/multi_adapter.yaml"],
    ],
    ids=["help", "validate", "validate-ludwig", "validate-refused", "plan", "plan-refused", "adapters-list"],
)
def test_first_commands_load_no_heavy_library(argv):
    assert loaded_modules(argv) == []


def test_import_config_loads_no_heavy_library():
    probe = f"import json, sys, madapt.config; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
