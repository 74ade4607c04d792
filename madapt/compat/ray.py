"""Ray internals madapt reaches: Serve's deploy-a-config client (what `serve run CONFIG` calls), Serve's
logger name, where `ray.init()` finds a cluster, and the model table of `@serve.multiplexed` (a replica that
evicts adapters by bytes takes them out of it). Checked against ray 2.60.

Ray is imported inside each function: `madapt --help` and `madapt validate` load no Ray.
"""

from __future__ import annotations

from typing import Any


def deploy_config(schema: Any) -> None:
    """Start Serve with the config's HTTP options and deploy its applications without waiting, as `serve run`
    does (`ray.serve.run` takes one application object, not a deploy config)."""
    from ray.serve._private import api as serve_api

    client = serve_api.serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema, _blocking=False)


def serve_logger_name() -> str:
    """The logger Serve writes its own progress lines to ("Started Serve ...")."""
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    return str(SERVE_LOGGER_NAME)


def started_cluster_address() -> str | None:
    """The address of this machine's `ray start` cluster: the file `ray start` writes and `ray stop` removes,
    which `ray.init()` with no address reads too (never a `ps` scan, as `address="auto"` falls back to)."""
    from ray._private.services import get_ray_address_from_environment

    address = get_ray_address_from_environment(None, None)
    return str(address) if address else None


def local_node() -> tuple[str, str]:
    """(GCS address, log directory) of the Ray node this driver started."""
    from ray._private.worker import global_worker

    node = global_worker.node
    return str(node.gcs_address), str(node.get_logs_dir_path())


MULTIPLEX_ATTR = "__serve_multiplex_wrapper"
"""Where `serve.multiplexed` keeps its `_ModelMultiplexWrapper`: on the wrapped function, made on first call."""


def _multiplex_wrapper(loader: Any) -> Any:
    """The `_ModelMultiplexWrapper` behind `loader` (what `serve.multiplexed` returned), or None before its
    first call."""
    return getattr(getattr(loader, "__wrapped__", None), MULTIPLEX_ATTR, None)


def multiplexed_ids(loader: Any) -> list[str]:
    """The model ids Serve's multiplexing holds for `loader` (what the replica reports to the routers)."""
    wrapper = _multiplex_wrapper(loader)
    return sorted(wrapper.models) if wrapper is not None else []


def forget_multiplexed(loader: Any, model_id: str) -> bool:
    """Take `model_id` out of the multiplexed models of `loader` (what `serve.multiplexed` returned) without
    calling its `__del__` (the caller unloads it), and have the replica push its model ids to the controller
    at the next tick (0.1 s), so routers stop sending that id here: what Serve's own `unload_model_lru` does
    to its table. False when Serve did not hold it (or has not made its table yet)."""
    wrapper = _multiplex_wrapper(loader)
    if wrapper is None:
        return False
    for needed in ("models", "registered_model_gauge", "models_unload_counter", "_push_multiplexed_replica_info"):
        if not hasattr(wrapper, needed):
            raise RuntimeError(f"ray's _ModelMultiplexWrapper has no {needed}; madapt is checked against ray 2.60")
    if model_id not in wrapper.models:
        return False
    del wrapper.models[model_id]
    wrapper.models_unload_counter.inc()
    wrapper.registered_model_gauge.set(0, tags={"model_id": model_id})
    wrapper._push_multiplexed_replica_info = True
    return True
