"""Following a run: TensorBoard event files for every run, MLflow and W&B when the config's `tracking:` asks.

The local trainer, or rank 0 of a Ray Train run, hands a `Tracker` one `log(metrics, step)` per optimizer
step (and the held-out loss when it is measured); the tracker writes it to every sink that is on. Each run
has a directory: `<storage_path>/<run>` for Ray Train (its own folder of the run, so
`tensorboard --logdir <storage_path>` shows every run on a shared filesystem or a bucket) and
`MADAPT_HOME/local_runs/<run>` for the local backend. Event files go to its `tensorboard/`; for a bucket
they are written on local disk and copied up at each flush through the store's pyarrow filesystem.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow.fs as pafs

from madapt.config import Config, madapt_home
from madapt.store import filesystem_for

TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
FLUSH_S = 10
"""Seconds between TensorBoard's own flushes to local disk, so `tensorboard` follows a run as it trains."""
RUN_TAG = "madapt.run"
"""MLflow tag naming madapt's run: a restarted Ray worker finds and continues its MLflow run by it."""


@dataclass(frozen=True)
class TrackingSpec:
    """Where and what to track, as plain values (Ray workers get this, never a Config)."""

    run: str
    run_dir: str
    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "madapt"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["offline", "online"] = "offline"
    params: dict[str, str] = field(default_factory=dict)
    located: tuple[Any, str] | None = None
    """(pyarrow filesystem, path) of `run_dir` as the driver resolved it, endpoint and keys included
    (`madapt.store.portable_filesystem`): Ray workers may lack the driver's object-storage settings."""

    @property
    def tensorboard_dir(self) -> str:
        return f"{self.run_dir.rstrip('/')}/{TENSORBOARD_DIR}"

    def run_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """`run_dir`'s filesystem and path: as the driver located it, else resolved here."""
        return self.located if self.located is not None else filesystem_for(self.run_dir)


def config_digest(config: Config, name: str) -> str:
    """A short hash of everything that shapes adapter `name`'s training (not where results are stored)."""
    relevant = config.model_dump(mode="json", exclude={"storage", "adapters", "adapter", "tracking"})
    relevant["adapter"] = config.named_adapters[name].model_dump(mode="json")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def local_run_dir(config: Config, name: str, label: str | None = None) -> tuple[str, Path]:
    """A fresh `<label>-<config hash>-<n>` directory under MADAPT_HOME/local_runs (created here, so two
    local trainings of the same config never share one); `label` (default: the adapter) names e.g. a member."""
    root = madapt_home() / "local_runs"
    root.mkdir(parents=True, exist_ok=True)
    digest = config_digest(config, name)
    for generation in itertools.count(1):
        run = f"{label or name}-{digest}-{generation}"
        try:
            (root / run).mkdir()
        except FileExistsError:
            continue
        return run, root / run
    raise AssertionError("unreachable")


def tracking_spec(config: Config, run: str, run_dir: str, params: dict[str, Any]) -> TrackingSpec:
    """The config's trackers for one run; MLflow defaults to a file store `mlruns/` beside the run dirs."""
    tracking = config.tracking
    mlflow_uri = None
    if tracking.mlflow is not None:
        mlflow_uri = tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if mlflow_uri is None:  # config.tracking_problems refused a bucket here
            parent = run_dir.removeprefix("file://").rstrip("/").rsplit("/", 1)[0]
            mlflow_uri = Path(parent, MLRUNS_DIR).as_uri()
    wandb = tracking.wandb
    return TrackingSpec(
        run=run,
        run_dir=run_dir,
        tensorboard=tracking.tensorboard,
        mlflow_uri=mlflow_uri,
        mlflow_experiment=tracking.mlflow.experiment_name if tracking.mlflow else "madapt",
        wandb_project=wandb.project if wandb else None,
        wandb_entity=wandb.entity if wandb else None,
        wandb_mode=wandb.mode if wandb else "offline",
        params=flat_params(params),
    )


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as `section.key -> text`, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Every sink the spec turns on; `resume_step` > 0 continues a run restarted from a checkpoint."""

    def __init__(self, spec: TrackingSpec, *, resume_step: int = 0):
        self.spec = spec
        self.sinks: list[Sink] = []
        if spec.tensorboard:
            fs, root = spec.run_filesystem()
            purge_step = resume_step + 1 if resume_step else None
            self.sinks.append(TensorBoardSink(fs, f"{root.rstrip('/')}/{TENSORBOARD_DIR}", purge_step=purge_step))
        if spec.mlflow_uri is not None:
            self.sinks.append(MlflowSink(spec))
        if spec.wandb_project is not None:
            self.sinks.append(WandbSink(spec))

    def log(self, metrics: dict[str, float | None], step: int) -> None:
        """Log the metrics that have a value (e.g. no grad norm under some engines) at optimizer step `step`."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for sink in self.sinks:
            sink.log(values, step)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoardSink:
    """tensorboardX event files (a light writer: no TensorFlow, no tensorboard package needed to write)."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.remote: tuple[pafs.FileSystem, str] | None = None
        local = root
        if not isinstance(fs, pafs.LocalFileSystem):
            self.remote = (fs, root)
            local = tempfile.mkdtemp(prefix="madapt-tensorboard-")
        self.local = Path(local)
        self.writer = SummaryWriter(logdir=local, flush_secs=FLUSH_S, purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is None:
            return
        fs, root = self.remote
        fs.create_dir(root, recursive=True)
        for path in self.local.iterdir():
            with fs.open_output_stream(f"{root}/{path.name}") as stream:
                stream.write(path.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()


class MlflowSink:
    """One MLflow run per madapt run, through MlflowClient (no global active run: parallel runs stay apart)."""

    def __init__(self, spec: TrackingSpec):
        import mlflow
        from mlflow.entities import Param

        assert spec.mlflow_uri is not None
        if spec.mlflow_uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; it is the offline default madapt documents.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=spec.mlflow_uri)
        experiment = self.client.get_experiment_by_name(spec.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(spec.mlflow_experiment)
        )
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{spec.run}'")
        if earlier:
            self.run_id = earlier[0].info.run_id
        else:
            run = self.client.create_run(experiment_id, run_name=spec.run, tags={RUN_TAG: spec.run})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in spec.params.items()])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def flush(self) -> None:
        """Nothing: every log call is already written."""

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run named (and identified) by madapt's run, so a restarted worker resumes it; offline by default."""

    def __init__(self, spec: TrackingSpec):
        import wandb

        fs, root = spec.run_filesystem()
        directory = root if isinstance(fs, pafs.LocalFileSystem) else str(madapt_home() / "wandb")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=spec.wandb_project,
            entity=spec.wandb_entity,
            mode=spec.wandb_mode,
            name=spec.run,
            id=spec.run,
            resume="allow",
            dir=directory,
            config=spec.params,
            reinit="create_new",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        """Nothing: W&B writes in its own process."""

    def close(self) -> None:
        self.run.finish()
