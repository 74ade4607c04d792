"""The Ray Serve application: `import_path: madapt.serve.app:build_app` with `args:` (`ServeArgs`).

Works with `serve run` and `serve deploy`; `madapt.serve.local.run_config` starts the same config
in-process for `madapt serve` and the demo. The rooms of the serving side:

- `args`: the serve config's `args:`, validated once (and filled from the training config it names);
- `ingress`: the HTTP routes (and API keys), handing each request to its endpoint in `openai`;
- `openai`: the OpenAI-compatible API per endpoint (wire models, parsing, errors, completions, chat,
  models and name resolution), laid out as vLLM's `entrypoints/openai`;
- `replica`: `AdapterServer`, one base model per replica with adapters multiplexed on demand;
- `scheduler`: the replica's batchers (continuous by default; static kept for comparison);
- `engine`: the decode loop over one mixed-adapter batch (stop strings, detokenization);
- `sampling`: each row's token choice (logits processors such as the penalties, greedy or seeded
  sampling, logprobs);
- `metrics`: the replica's Prometheus metrics (names, units, bounded labels), and the ingress's per split arm;
- `multilora`: `MultiLora`, the per-row LoRA layer that gathers each row's adapter factors;
- `constrain`: structured output (`response_format`) as a per-row grammar mask on the logits;
- `request_merges`: per-request weighted merges of adapters, built into a batch slot and cached by recipe;
- `registry`: hot adapter copies; `auth`: API keys; `health`: the decode watchdog;
- `local`: running a config on this machine and probing readiness.
"""

from typing import Any

from ray import serve

from madapt.serve.args import ServeArgs, resolve_args
from madapt.serve.ingress import OpenAIIngress
from madapt.serve.replica import AdapterServer
from madapt.store import storage_runtime_env


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `import_path: madapt.serve.app:build_app`; `args` are `ServeArgs`. Bad args, or a
    training config (`config:`) with problems, raise a ConfigError listing every problem."""
    return application(resolve_args(args))


def application(settings: ServeArgs, *, replicas: int | None = None) -> serve.Application:
    """The ingress bound to `AdapterServer`; `replicas` fixes its replica count (else the deployment's own)."""
    plain = settings.model_dump()
    server: serve.Deployment = AdapterServer
    ingress: serve.Deployment = OpenAIIngress
    runtime_env = storage_runtime_env()  # both read the store; the registry actor inherits it from them
    if runtime_env:
        server, ingress = (
            d.options(ray_actor_options={**d.ray_actor_options, "runtime_env": runtime_env}) for d in (server, ingress)
        )
    if replicas:
        server = server.options(num_replicas=replicas)
    return ingress.bind(server.bind(plain), plain)
