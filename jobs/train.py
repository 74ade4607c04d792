"""Ray job entrypoint: train a config's adapters on the cluster the job runs in, one Ray Train run each.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python jobs/train.py examples/multi_adapter.yaml [--adapter NAME] [--parallel] [--pack]

Each finished adapter is published to the config's store; rerunning the same job after a failure resumes
each unfinished run from its latest checkpoint. `--pack` (or backend.trainer.pack_adapters) trains the
adapters that can share a run as one pack, one Ray Train run, as `madapt train --pack` does. The declared
merge is not run here (see jobs/merge.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ on sys.path; the uploaded working dir's root holds the madapt package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from madapt.config import Config, ConfigError, data_problems, load_config
from madapt.store import AdapterStore, Manifest


def setup(config_path: str, adapters: list[str] | None) -> tuple[Config, list[str], AdapterStore]:
    config = load_config(config_path)
    names = adapters or list(config.named_adapters)
    unknown = [n for n in names if n not in config.named_adapters]
    if unknown:
        raise ConfigError(
            [f"--adapter {n!r} is not declared; declared: {list(config.named_adapters)}" for n in unknown]
        )
    problems = data_problems(config, names)  # a job reads the data its config names: refused before any run
    if problems:
        raise ConfigError(problems, config_path)
    return config, names, AdapterStore(config.storage.uri)


def run(config: Config, names: list[str], store: AdapterStore, *, parallel: bool, pack: bool) -> list[Manifest]:
    import ray

    from madapt.train.distributed import train_adapters

    ray.init()  # inside a Ray job this connects to the job's cluster
    if pack:
        return train_pack(config, names, parallel=parallel)
    return train_adapters(config, names, store, parallel=parallel)


def train_pack(config: Config, names: list[str], *, parallel: bool) -> list[Manifest]:
    """The adapters that can share a run as one pack, announced as `madapt train --pack` announces it; the
    others one run each. If some failed, the published ones are reported before the error."""
    from madapt.api import Model, PackFailed
    from madapt.cli import announce_pack

    model = Model(config)
    announce_pack(model, names)
    try:
        return list(model.train(adapters=names, parallel=parallel, pack=True).values())
    except PackFailed as failed:
        save(list(failed.published.values()))
        raise


def save(manifests: list[Manifest]) -> None:
    """The runs already published to the store; report what was saved where."""
    for manifest in manifests:
        m = manifest.metrics
        print(f"published {manifest.ref}: final loss {m['final_loss']:.4f}, {m['tokens_per_s']:.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--adapter", action="append", help="train only this adapter (repeatable)")
    parser.add_argument("--parallel", action="store_true", help="train the adapters side by side")
    parser.add_argument(
        "--pack", action="store_true", help="train the adapters as one pack (backend.trainer.pack_adapters)"
    )
    args = parser.parse_args(argv)
    config, names, store = setup(args.config, args.adapter)
    pack = args.pack or config.backend.trainer.pack_adapters
    save(run(config, names, store, parallel=args.parallel, pack=pack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
