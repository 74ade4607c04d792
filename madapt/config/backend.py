"""Config sections about where things run and go: the adapter store, the Ray backend and experiment tracking."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from madapt.config.ludwig import Strict
from madapt.config.names import Strategy
from madapt.config.paths import madapt_home


class StorageConfig(Strict):
    uri: str = Field(
        default_factory=lambda: os.environ.get("MADAPT_STORE") or str(madapt_home() / "store"),
        description="Adapter store: a local path, file://, s3:// or gs:// URI (pyarrow.fs).",
    )


class RayTrainerConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    strategy: Strategy = Field(
        "ddp",
        description="Default: fsdp with several workers, ddp with one. Also Ludwig's dict form "
        "{type: deepspeed, zero_optimization: {...}, ...} (the rest is DeepSpeed config) or {type: fsdp}.",
    )
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Default: 1 GPU per worker with use_gpu, else a CPU share that fits the machine."
    )
    deepspeed_stage: Literal[2, 3] = 2
    deepspeed_config: dict[str, Any] = Field(
        default_factory=dict, description="Extra DeepSpeed config (from the strategy dict), merged over madapt's."
    )
    storage_path: str | None = Field(None, description="Ray Train checkpoints; must be shared across nodes.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by restarting from a checkpoint.")
    checkpoint_every: int = Field(20, ge=1, description="Optimizer steps between checkpoints.")
    pack_adapters: bool = Field(
        False,
        description="madapt: train the selected adapters as one pack (one run on one resident base, each row "
        "through its own adapter); `madapt train --pack` sets it for one command.",
    )
    pack_max_rows: int | None = Field(
        None,
        ge=1,
        description="madapt: most rows one forward of a pack holds; its lanes go forward and backward in groups "
        "of at most this many (default: the largest batch_size on CPU, 4 x it on GPU).",
    )
    pack_memory: str | None = Field(
        None,
        pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
        description="madapt: memory of one worker that trains a pack, e.g. 20GB or 24GiB: packs too large for it "
        "are split (madapt plan's estimate). Default: the host's available memory for CPU workers; none with "
        "use_gpu.",
    )
    ludwig_ignored: ClassVar[dict[str, str]] = {"nics": "legacy Horovod option; madapt trains with torch.distributed"}

    @classmethod
    def value_notes(cls, data: dict[Any, Any]) -> dict[str, tuple[str, bool]]:
        strategy = data.get("strategy")
        if isinstance(strategy, dict) and strategy.get("type") in ("fsdp", "ddp") and set(strategy) - {"type"}:
            extra = sorted(str(k) for k in set(strategy) - {"type"})
            return {"strategy": (f"madapt's {strategy['type']} takes no options; {extra} ignored", False)}
        return {}

    @model_validator(mode="before")
    @classmethod
    def _strategy_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy")
        if isinstance(strategy, dict):
            rest = {k: v for k, v in strategy.items() if k != "type"}
            data = {**data, "strategy": strategy.get("type")}
            if data["strategy"] == "deepspeed":
                zero = rest.get("zero_optimization")
                stage = zero.get("stage") if isinstance(zero, dict) else None
                if stage is not None:
                    if "deepspeed_stage" in data and data["deepspeed_stage"] != stage:
                        raise ValueError(
                            f"strategy.zero_optimization.stage {stage} and deepspeed_stage "
                            f"{data['deepspeed_stage']} disagree: keep one"
                        )
                    data["deepspeed_stage"] = stage
                data["deepspeed_config"] = {**rest, **data.get("deepspeed_config", {})}
        if data.get("strategy") is None:
            workers = data.get("num_workers", 1)
            data = {**data, "strategy": "fsdp" if isinstance(workers, int) and workers > 1 else "ddp"}
        return data


class MlflowConfig(Strict):
    """MLflow run per training run (rank 0 logs); `mlflow: true` takes every default."""

    tracking_uri: str | None = Field(
        None,
        description="Default: $MLFLOW_TRACKING_URI, else a file store `mlruns/` beside the runs (offline-friendly).",
    )
    experiment_name: str = Field("madapt", min_length=1, description="Ludwig's --experiment_name.")


class WandbConfig(Strict):
    """Weights & Biases run per training run; offline by default (`wandb sync` uploads it later)."""

    project: str = Field("madapt", min_length=1)
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"


class TrackingConfig(Strict):
    """madapt's `tracking:` section (Ludwig turns its contrib loggers on with --mlflow/--wandb; here it is config).
    TensorBoard event files are written for every run unless `tensorboard: false`."""

    tensorboard: bool = True
    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """`true` turns a logger on with its defaults, `false` leaves it off."""
        if value is True:
            return {}
        return None if value is False else value


class BackendConfig(Strict):
    type: Literal["ray", "local"] = "ray"
    trainer: RayTrainerConfig = Field(default_factory=RayTrainerConfig)
    ludwig_ignored: ClassVar[dict[str, str]] = {
        "processor": "madapt reads data with pyarrow (local) or Ray Data (ray) and needs no processor settings",
        "loader": "madapt reads data with pyarrow (local) or Ray Data (ray) and needs no loader settings",
        **dict.fromkeys(
            ["cache_dir", "cache_credentials", "cache_format"], "madapt caches no preprocessed datasets; ignored"
        ),
        "credentials": "madapt reaches object storage with the environment's credentials (pyarrow.fs)",
        "preprocessor_kwargs": "madapt reads data with pyarrow (local) or Ray Data (ray); no preprocessor settings",
    }

    @model_validator(mode="before")
    @classmethod
    def _string_form(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data
