"""`make demo`: madapt's main job end to end on the embedded base model.

Train every adapter of the config on Ray Train, merge them in the AdapterMerger actor and print the
quality table, then serve everything with Ray Serve and ask the base, each adapter and the merge the
same question over HTTP.
"""

from __future__ import annotations

import sys

from madapt import cli
from madapt.config import load_config

SERVE_CONFIG = "serve_configs/multi_adapter.yaml"
QUESTIONS = ["How do I reverse a list in Python?", "I had a rough day at work. Any advice?"]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path = argv[0] if argv else "examples/multi_adapter.yaml"
    config = load_config(config_path)
    models = ["base", *config.named_adapters, *([config.merge.name] if config.merge else [])]

    banner(f"train {list(config.named_adapters)} on {config.base_model}, then merge and evaluate")
    status = cli.main(["train", config_path])
    if status:
        return status

    banner(f"serve {models} from one base model ({SERVE_CONFIG})")
    from madapt.serve.app import ask_all

    answers = ask_all(SERVE_CONFIG, models, QUESTIONS)
    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for model in models:
            print(f"  [{model}] {answers[question][model]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
