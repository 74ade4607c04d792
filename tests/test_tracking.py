"""Following a run on the local backend: TensorBoard event files (read back with tensorboard's own reader),
an MLflow run in a file store, a loss curve per published version, and the `tracking:` section's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from madapt.charts import loss_plot_path, plot_losses
from madapt.config import ConfigError, parse_config
from madapt.store import AdapterStore
from madapt.tracking import local_run_dir
from madapt.train.local import train_local
from madapt.train.settings import settings_for
from tests.helpers import tensorboard_scalars, tiny_config

STEPS = 3


@pytest.fixture(scope="module")
def tracked(tiny_model, tmp_path_factory):
    """One adapter trained with MLflow and W&B (offline) on, in a home of its own."""
    home = tmp_path_factory.mktemp("home")
    document = tiny_config(tiny_model, str(home / "store"), tracking={"mlflow": True, "wandb": True})
    document["adapters"] = {"adapters": {"coding": document["adapters"]["adapters"]["coding"]}}
    document["trainer"]["max_steps"] = STEPS
    document["trainer"]["learning_rate_scheduler"] = {"decay": "linear", "warmup_fraction": 0.34}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADAPT_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("WANDB_SILENT", "true")
        config = parse_config(document)
        store = AdapterStore(config.storage.uri)
        manifest = train_local(config, "coding", store, progress=False)
        yield config, manifest, home


def test_every_local_run_writes_tensorboard_events(tracked):
    config, manifest, home = tracked
    first = manifest.metrics
    assert first["run_dir"] == str(home / "local_runs" / first["run"])
    assert local_run_dir(config, "coding")[1] != Path(first["run_dir"])  # the next run gets a directory of its own
    logged = tensorboard_scalars(first["run_dir"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= set(logged)
    assert [step for step, _ in logged["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in logged["train/loss"]] == pytest.approx(first["losses"], rel=1e-6)
    settings = settings_for(config.trainer, 1)
    expected_lr = [settings.learning_rate_at(step) for step in range(STEPS)]  # warm-up from 0, then linear decay
    assert [v for _, v in logged["train/learning_rate"]] == pytest.approx(expected_lr, rel=1e-6)
    assert expected_lr[0] == 0 and max(expected_lr) == pytest.approx(config.trainer.learning_rate)
    assert all(v > 0 for _, v in logged["train/grad_norm"])
    assert logged["eval/loss"] == [(STEPS, pytest.approx(first["eval_loss"], rel=1e-6))]


def test_mlflow_run_is_recorded_in_a_file_store(tracked):
    import mlflow

    _, manifest, home = tracked
    client = mlflow.MlflowClient(tracking_uri=(home / "local_runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("madapt")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in runs] == [manifest.metrics["run"]]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(manifest.metrics["losses"], rel=1e-6)
    assert runs[0].data.params["adapter.r"] == "8"
    assert runs[0].data.params["trainer.total_steps"] == str(STEPS)


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run, read from its record log (LevelDB's log format: 32 KiB blocks of
    checksum, length, type, payload) with W&B's own protobuf schema for each record."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, block, records, pending = run_file.read_bytes(), 7, 32768, [], b""  # 7: W&B's file header
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            position += left  # block trailer padding
            continue
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first, middle, last
        if kind in (1, 4):
            records.append(pending)
    rows = []
    for payload in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_run_has_every_step(tracked):
    _, manifest, _ = tracked
    run = manifest.metrics["run"]
    (run_file,) = Path(manifest.metrics["run_dir"]).glob(f"wandb/offline-run-*-{run}/run-{run}.wandb")
    rows = [row for row in wandb_history(run_file) if "train/loss" in row]
    assert [row["_step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["train/loss"] for row in rows] == pytest.approx(manifest.metrics["losses"], rel=1e-6)


def test_loss_curves_are_kept_per_version(tracked, monkeypatch):
    pytest.importorskip("matplotlib")
    _, manifest, home = tracked
    monkeypatch.setenv("MADAPT_HOME", str(home))
    first = loss_plot_path("coding", manifest.version)
    assert first.relative_to(home).as_posix() == "runs/coding/1/loss.png"  # drawn by the local trainer
    drawn = first.read_bytes()
    second = plot_losses("coding", 2, [3.0, 2.0, 1.0])
    assert second == home / "runs" / "coding" / "2" / "loss.png" and second.stat().st_size > 1000
    assert first.read_bytes() == drawn  # the next version's curve leaves this one alone


def test_tracking_section_rules(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    document = tiny_config(tiny_model, str(tmp_path / "store"), tracking={"mlflow": True, "wandb": False})
    config = parse_config(document)
    assert config.tracking.tensorboard and config.tracking.mlflow.experiment_name == "madapt"
    assert config.tracking.wandb is None
    bucket = {"type": "ray", "trainer": {"storage_path": "s3://bucket/runs"}}
    with pytest.raises(ConfigError) as error:
        parse_config({**document, "tracking": {"mlflow": True, "mlfow": 1}, "backend": bucket})
    problems = "\n".join(error.value.problems)
    assert "tracking.mlfow: unknown key" in problems and "did you mean 'mlflow'?" in problems
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.tracking_uri: MLflow's default file store"):
        parse_config({**document, "backend": bucket})
    served = {"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}
    assert parse_config({**document, "tracking": served, "backend": bucket}).tracking.mlflow.tracking_uri
    with pytest.raises(ConfigError, match=r"tracking\.wandb\.mode: Input should be 'offline' or 'online'"):
        parse_config({**document, "tracking": {"wandb": {"mode": "cloud"}}})
