"""Running a serve config on this machine: what `madapt serve` and the demo use, and the readiness probe."""

import logging
import time
from typing import Any

from ray import serve

from madapt.cluster import SETTINGS, connect
from madapt.compat.ray import deploy_config, serve_logger_name
from madapt.config import ConfigError
from madapt.predict import BASE_ID
from madapt.serve.args import SERVE_ARGS, resolve_args
from madapt.serve.auth import read_keys


def run_config(path: str, *, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 600) -> str:
    """Deploy a serve config file on the Ray cluster pointed at, else on a private local Ray (madapt.cluster),
    as `serve run` does; return the URL.

    madapt's args are resolved here (`resolve_args`: the training config they name is read, relative paths
    are taken from the current directory), since the replicas' working directory is Ray's, not the caller's.
    """
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(path) as handle:
        document = yaml.safe_load(handle)
    document["http_options"] = {**document.get("http_options", {}), "host": host, "port": port}
    for index, application in enumerate(document.get("applications", [])):
        if str(application.get("import_path", "")).startswith("madapt."):
            try:
                application["args"] = resolve_args(application.get("args")).model_dump(mode="json")
            except ConfigError as error:
                if error.source != SERVE_ARGS:
                    raise  # the training config's problems, naming its file
                raise ConfigError([f"applications[{index}].args.{p}" for p in error.problems], path) from None
    schema = ServeDeploySchema.model_validate(document)
    connect(start=True, namespace="serve")
    if not SETTINGS.verbose:  # Serve's own progress lines ("Started Serve ..."): its logs are in Ray's files
        logging.getLogger(serve_logger_name()).setLevel(logging.WARNING)
    deploy_config(schema)
    url = f"http://{host}:{port}"
    wait_ready(url, timeout_s, api_key=probe_key(document))
    return url


def probe_key(document: dict[str, Any]) -> str | None:
    """A key the readiness probe can send when the config turns authentication on (as the replicas will
    see them: this process's environment is the local workers' environment)."""
    for application in document.get("applications", []):
        args = application.get("args", {})
        if args.get("api_keys_file") or args.get("api_keys_env"):
            return read_keys(args.get("api_keys_file"), args.get("api_keys_env"))[0]
    return None


def wait_ready(url: str, timeout_s: float, *, api_key: str | None = None) -> None:
    """Block until the ingress answers and a replica answers a one-token base request."""
    import json
    import urllib.error
    import urllib.request

    probe = json.dumps({"model": BASE_ID, "prompt": "hi", "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request = urllib.request.Request(f"{url}/v1/completions", probe, headers)
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the serve application at {url} was not ready after {timeout_s:.0f} s")
        time.sleep(1)


def ask_all(
    config_path: str, adapters: list[str], prompts: list[str], *, port: int = 8000, max_tokens: int = 32
) -> dict[str, dict[str, str]]:
    """Start `config_path`, send each prompt to each adapter over HTTP (greedy chat), shut down.

    What `make demo` ends with: proof that the published adapters are servable end to end.
    Returns {prompt: {adapter: text}}.
    """
    import json
    import urllib.request

    url = run_config(config_path, port=port)
    answers: dict[str, dict[str, str]] = {}
    try:
        for prompt in prompts:
            for adapter in adapters:
                body: dict[str, Any] = {"model": adapter, "messages": [{"role": "user", "content": prompt}]}
                body |= {"max_tokens": max_tokens, "temperature": 0}
                request = urllib.request.Request(
                    f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=300) as response:
                    text = json.loads(response.read())["choices"][0]["message"]["content"]
                answers.setdefault(prompt, {})[adapter] = text
    finally:
        serve.shutdown()
    return answers
