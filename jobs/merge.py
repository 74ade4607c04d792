"""Ray job entrypoint: run a config's declared merge on the cluster's named AdapterMerger actor.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python jobs/merge.py examples/multi_adapter.yaml [--overwrite] [--detached]

The merge is published to the config's store with its lineage; the quality report is `madapt eval CONFIG`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `python jobs/merge.py` puts jobs/ on sys.path; the uploaded working dir's root holds the madapt package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from madapt.config import ConfigError, load_config
from madapt.merge import MergeSpec
from madapt.merge.actor import run_merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a config's merge on the cluster's AdapterMerger actor.")
    parser.add_argument("config")
    parser.add_argument("--overwrite", action="store_true", help="publish a new version even if lineage differs")
    parser.add_argument("--detached", action="store_true", help="keep the merger actor alive after this job")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    if config.merge is None:
        raise ConfigError(["adapters.merge: this config declares no merge"], args.config)
    spec = MergeSpec.from_config(config.merge)
    manifest = run_merge(config.storage.uri, spec, overwrite=args.overwrite, detached=args.detached)
    print(f"published {manifest.ref} with lineage {manifest.lineage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
