"""The Ray Train driver: each named adapter is one TorchTrainer run (FSDP2, DDP or DeepSpeed; LoRA or QLoRA)
of `train_loop_per_worker` (worker.py, which runs the shared loop).

`train_ray` checks the request against the cluster, names the run deterministically from the adapter and its
config (so rerunning the same command after the driver died resumes the run from its latest checkpoint in
`storage_path`), runs `fit()`, and publishes the final checkpoint to the store exactly once (its best
evaluation's adapter under `trainer.early_stop`). `train_adapters` trains several, one run each. Ray Train
V2 is touched here and in worker.py and checkpoints.py only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from madapt.cluster import connect, wait_for_resources
from madapt.config import Config, ConfigError, madapt_home
from madapt.data import READERS, Example
from madapt.sources import DatasetLike, read_source
from madapt.store import AdapterStore, CorruptAdapter, Manifest, filesystem_for, portable_filesystem
from madapt.tracking import TrackingSpec, config_digest, tracking_spec
from madapt.train.checkpoints import publish_checkpoint
from madapt.train.loop import EVAL_ROWS, Member, early_stop_for, ensemble_dispatch, run_examples, tokenized
from madapt.train.settings import TrainSettings, run_params
from madapt.train.spec import RunSpec, run_spec
from madapt.train.worker import train_loop_per_worker

PUBLISHED = "published.json"
"""Written beside a run's checkpoints once the run is published: the next run of the same config is a new one."""


def train_ray(
    config: Config,
    name: str,
    store: AdapterStore,
    *,
    dataset: DatasetLike | None = None,
    eval_dataset: DatasetLike | None = None,
    member: Member | None = None,
    progress: bool = True,
) -> Manifest:
    """Train adapter `name` as one Ray Train run (resuming an unfinished run of the same config and data) and
    publish it; `dataset` and `eval_dataset` replace the config's (see `load_splits`). `progress`: draw a bar
    of its steps and losses.

    An adapter with an `ensemble` trains its members as parallel runs, then publishes their merge;
    `member` = (published name, shard index, members) is one of those runs."""
    from madapt.models import load_tokenizer

    def train_member(member: Member) -> Manifest:
        return train_ray(
            config, name, store, dataset=dataset, eval_dataset=eval_dataset, member=member, progress=progress
        )

    merged = ensemble_dispatch(
        config, name, store, member, train_member, parallel=True, prepare=lambda: connect(start=True)
    )
    if merged is not None:
        return merged
    published, train_examples, eval_examples = run_examples(config, name, member, dataset, eval_dataset)
    tokenizer = load_tokenizer(config.base_model, trust_remote_code=config.trust_remote_code)
    _, truncation = tokenized(tokenizer, train_examples, config.trainer.max_length, published)
    has_eval = eval_dataset is not None or config.named_adapters[name].eval_dataset is not None
    spec = run_spec(config, name, len(train_examples), eval_dataset=has_eval)  # refuses impossible combinations
    storage, run = place_run(config, name, published, None if dataset is None else examples_digest(train_examples))
    spec = dataclasses.replace(
        spec,
        name=published,
        shard=member[1:] if member else None,
        tracking=run_tracking(config, name, spec.settings, storage, run),
        eval_examples=eval_examples[:EVAL_ROWS],
    )
    early_stop_for(spec.settings, published, spec.eval_examples)  # refuses early_stop without held-out rows
    already = published_by(store, published, run)
    if already is not None:  # a driver that died between publishing and marking the run: publish nothing twice
        mark_published(storage, run, already)
        return already
    checkpoint = fit(config, spec, storage, run, dataset if dataset is not None else config.dataset_for(name), progress)
    with checkpoint.as_directory() as directory:
        manifest = publish_checkpoint(Path(directory), config, spec, store, run, truncation)
    mark_published(storage, run, manifest)
    return manifest


def place_run(config: Config, name: str, label: str, data: str | None) -> tuple[str, str]:
    """(storage path, run name) of adapter `name`'s run (`label`: its published name), once the cluster is
    joined and can hold the run's workers; `data`: the digest of data given outside the config."""
    import ray

    connect(start=True)
    trainer = config.backend.trainer
    check_resources(name, trainer.num_workers, worker_resources(config), ray.cluster_resources())
    storage = storage_path(config, alive_nodes=sum(1 for node in ray.nodes() if node["Alive"]))
    return storage, run_name(config, name, storage, label, data=data)


def run_tracking(config: Config, name: str, settings: TrainSettings, storage: str, run: str) -> TrackingSpec:
    """Rank 0's trackers, writing under `<storage>/<run>` (through the portable filesystem on a URI)."""
    tracking = tracking_spec(config, run, f"{storage}/{run}", run_params(config, name, settings))
    if "://" in storage:  # the workers write the run's events through this driver's filesystem too
        storage_fs, location = portable_filesystem(storage)
        tracking = dataclasses.replace(tracking, located=(storage_fs, f"{location.rstrip('/')}/{run}"))
    return tracking


def fit(config: Config, spec: RunSpec, storage: str, run: str, dataset: DatasetLike | None, progress: bool):
    """Run the TorchTrainer to its end (resuming `run` from its latest checkpoint); its final checkpoint."""
    datasets = {"train": read_dataset(dataset)}
    return fit_loop(config, train_loop_per_worker, spec, datasets, storage, run, label=spec.name, progress=progress)


def fit_loop(
    config: Config,
    loop: Callable[[dict[str, Any]], None],
    spec: Any,
    datasets: dict[str, Any],
    storage: str,
    run: str,
    *,
    label: str,
    progress: bool,
):
    """Run a TorchTrainer of `loop` (told `spec`, reading Ray Datasets `datasets`) to its end, resuming `run`
    from its latest checkpoint; its final checkpoint. `label` names the run in the bar and errors."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer_config = config.backend.trainer
    # Built here, not from the URI in Ray Train's controller and workers, whose processes may not know this
    # driver's AWS_ENDPOINT_URL and keys: a portable filesystem carries them wherever it is sent.
    storage_fs, storage_location = portable_filesystem(storage) if "://" in storage else (None, storage)
    with progress_bar(label, enabled=progress) as board:
        trainer = TorchTrainer(
            loop,
            train_loop_config={"spec": spec, "progress": board},
            datasets=datasets,
            scaling_config=ray.train.ScalingConfig(
                num_workers=trainer_config.num_workers,
                use_gpu=trainer_config.use_gpu,
                resources_per_worker=worker_resources(config),
            ),
            run_config=ray.train.RunConfig(
                name=run,
                storage_path=storage_location,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=trainer_config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run!r} (train {label}) finished without a checkpoint")
    return result.checkpoint


class ProgressBoard:
    """Rank 0's latest step metrics, held by a zero-CPU actor: the driver draws its bar from them, so progress
    shows without the workers' output (which stays in Ray's log files unless --verbose)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def post(self, metrics: dict[str, Any]) -> None:
        self.latest = metrics

    def read(self) -> dict[str, Any]:
        return self.latest


@contextlib.contextmanager
def progress_bar(name: str, *, enabled: bool) -> Iterator[Any]:
    """A bar of adapter `name`'s steps, loss and tokens/s, redrawn each second from the ProgressBoard actor
    it yields (None when not `enabled`)."""
    if not enabled:
        yield None
        return
    import ray
    from tqdm import tqdm

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    bar = tqdm(desc=f"train {name}", unit="step", dynamic_ncols=True)
    stopped = threading.Event()

    def redraw() -> None:
        metrics = ray.get(board.read.remote())
        if metrics and metrics["step"] != bar.n:  # one redraw per step, not per poll
            bar.total = metrics["total_steps"]
            bar.update(metrics["step"] - bar.n)
            bar.set_postfix_str(f"loss {metrics['loss']:.4f}, {metrics['tokens_per_s']:.0f} tok/s")

    def follow() -> None:
        while not stopped.wait(1.0):
            redraw()

    thread = threading.Thread(target=follow, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield board
        stopped.set()
        thread.join()
        redraw()
    finally:
        stopped.set()
        bar.close()
        ray.kill(board)


def read_dataset(dataset: DatasetLike | None):
    """The adapter's data as a Ray Dataset in file order (so one worker sees what train_local sees): a CSV,
    JSONL or Parquet file or URI through Ray Data's reader (CSV cells as text, as train_local reads them;
    a URI with this driver's endpoint and keys),
    any other source read on the driver by sources.py."""
    import pyarrow.csv as pa_csv
    import ray.data

    assert dataset is not None  # load_splits already refused a missing dataset
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the workers print per-step progress; a bar per shard is noise
    kind = READERS.get(Path(dataset).suffix.lower()) if isinstance(dataset, str | os.PathLike) else None
    if kind is None:
        return ray.data.from_arrow(read_source(dataset))
    path = os.fspath(dataset)
    # A URI is resolved here: the read tasks may lack this driver's endpoint and keys (portable_filesystem).
    filesystem, location = portable_filesystem(path) if "://" in path else (None, path)
    if kind == "csv":
        text = {name: pa.string() for name in read_source(path).column_names}
        options = pa_csv.ConvertOptions(column_types=text)
        return ray.data.read_csv(location, filesystem=filesystem, convert_options=options)
    if kind == "json":
        return ray.data.read_json(location, filesystem=filesystem)
    return ray.data.read_parquet(location, filesystem=filesystem)


def worker_resources(config: Config) -> dict[str, float]:
    """Explicit resources, else one GPU per worker, else half a CPU (two workers, the controller and the data
    actors then fit a 2-core machine; a full CPU each hangs waiting for the CPU they hold)."""
    trainer = config.backend.trainer
    if trainer.resources_per_worker:
        return dict(trainer.resources_per_worker)
    return {"CPU": 1.0, "GPU": 1.0} if trainer.use_gpu else {"CPU": 0.5}


def check_resources(name: str, num_workers: int, per_worker: dict[str, float], cluster: dict[str, float]) -> None:
    """Fail fast on a request the cluster can never satisfy, instead of waiting for it forever."""
    problems = [
        f"backend.trainer: adapter {name!r} needs {amount * num_workers:g} {key} "
        f"({num_workers} workers x {amount:g}) but the Ray cluster has {cluster.get(key, 0):g}"
        for key, amount in per_worker.items()
        if amount * num_workers > cluster.get(key, 0)
    ]
    if problems:
        raise ConfigError(problems)


def storage_path(config: Config, *, alive_nodes: int) -> str:
    """Where Ray Train keeps runs: `storage_path`, else MADAPT_HOME/ray_runs; shared storage on multi-node."""
    path = config.backend.trainer.storage_path
    if path is None:
        path = str(madapt_home() / "ray_runs")
    if "://" not in path:
        if alive_nodes > 1:
            raise ConfigError(
                [
                    f"backend.trainer.storage_path: {path!r} is local but the Ray cluster has {alive_nodes} nodes; "
                    "use shared storage (s3://, gs://, or an NFS mount given as file://)"
                ]
            )
        path = str(Path(path).expanduser().resolve())
    return path


def run_name(config: Config, name: str, storage: str, label: str | None = None, *, data: str | None = None) -> str:
    """`<label>-<config hash>-<n>` (label: the adapter, or an ensemble member): the first generation of this
    config not yet published, so rerunning an interrupted command resumes its run while rerunning a finished
    one trains afresh. `data`: a digest of data given outside the config (`--dataset`), which the config's
    own paths do not name."""
    digest = config_digest(config, name)
    if data is not None:
        digest = hashlib.sha256(f"{digest}:{data}".encode()).hexdigest()[:10]
    fs, root = filesystem_for(storage)
    for generation in itertools.count(1):
        run = f"{label or name}-{digest}-{generation}"
        if fs.get_file_info(f"{root}/{run}/{PUBLISHED}").type == pafs.FileType.NotFound:
            return run
    raise AssertionError("unreachable")


def examples_digest(examples: list) -> str:
    """Identifies training data given outside the config, whatever its source (file, DataFrame, hub)."""
    digest = hashlib.sha256()
    for example in examples:
        if isinstance(example, Example):
            digest.update(json.dumps([example.prompt, example.response, example.messages]).encode())
        else:  # a preference pair or KTO row (frozen dataclasses of text)
            digest.update(repr(example).encode())
    return digest.hexdigest()[:10]


def published_by(store: AdapterStore, name: str, run: str) -> Manifest | None:
    """The version of `name` that run `run` published, if any."""
    for version in reversed(store.versions(name)):
        try:
            manifest = store.manifest(f"{name}@{version}")
        except CorruptAdapter:
            continue  # not this run's: a run's own publish is verified before it is marked
        if manifest.metrics.get("run") == run:
            return manifest
    return None


def mark_published(storage: str, run: str, *manifests: Manifest) -> None:
    """Mark run `run` published (with what it published: one adapter, or a pack's)."""
    fs, root = filesystem_for(storage)
    fs.create_dir(f"{root}/{run}", recursive=True)
    with fs.open_output_stream(f"{root}/{run}/{PUBLISHED}") as stream:
        stream.write(json.dumps({"refs": [manifest.ref for manifest in manifests]}).encode())


def train_adapters(
    config: Config,
    names: list[str],
    store: AdapterStore,
    *,
    parallel: bool = False,
    datasets: dict[str, DatasetLike] | None = None,
    eval_datasets: dict[str, DatasetLike] | None = None,
    progress: bool = True,
) -> list[Manifest]:
    """Train several adapters, one Ray Train run each; `parallel` runs them side by side (Ray queues the
    workers of runs that do not fit yet). `datasets`/`eval_datasets`: per adapter, replacing the config's.

    First, the cluster must have one run's workers free within a bounded time (see madapt.cluster): Ray
    Train would otherwise wait forever for resources that Serve replicas or other jobs hold."""
    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    connect(start=True)
    trainer = config.backend.trainer
    per_worker = worker_resources(config)
    workers = (
        f"Ray Train's {trainer.num_workers} worker(s) ({', '.join(f'{v:g} {k}' for k, v in per_worker.items())} each)"
    )
    wait_for_resources({key: amount * trainer.num_workers for key, amount in per_worker.items()}, workers)

    def train(name: str) -> Manifest:
        return train_ray(
            config, name, store, dataset=datasets.get(name), eval_dataset=eval_datasets.get(name), progress=progress
        )

    if not parallel:
        return [train(name) for name in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(train, names))
