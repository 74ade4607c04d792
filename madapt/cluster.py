"""Which Ray cluster a madapt command joins, how much of Ray's output it shows, and waiting for room.

A command joins a cluster only when the user points at one: `--address`, RAY_ADDRESS, or the `ray start`
cluster of this machine (the address file `ray start` writes and `ray stop` removes, which `ray.init()`
reads too). Never `ray.init(address="auto")`: without that file, Ray 2.60 joins any Ray whose GCS process
`ps` shows, such as the private Ray of a running `madapt serve` (started by `ray.init()`, which writes no
address file), whose replicas hold its CPUs. Without a cluster, training starts a private local Ray and a
merge runs in-process.

On a cluster, work that needs resources other work holds (Serve replicas, another job's workers) would
queue forever; `wait_for_resources` waits a bounded time (MADAPT_RESOURCE_WAIT_S, default 60 s), then
names what is needed and what the cluster has.

Ray's own output (its workers' logs, Ray Train's and Ray Data's progress messages, library warnings) stays
in Ray's log files unless `configure(verbose=True)` (`--verbose`): madapt prints its own progress.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass

from madapt.compat.ray import local_node, started_cluster_address
from madapt.config import ConfigError

LIBRARIES = r"(transformers|peft|torch|accelerate|deepspeed|ray)(\.|$)"
"""Modules whose deprecation notices are for madapt's maintainers, not its users: hidden unless verbose."""
START_CLUSTER = "the `ray start` cluster on this machine"
RESOURCE_WAIT_ENV = "MADAPT_RESOURCE_WAIT_S"
DEFAULT_RESOURCE_WAIT_S = 60.0


class ClusterError(ConfigError):
    """The Ray cluster pointed at cannot be reached, or cannot give what a command asks for. A ConfigError, so
    the CLI reports it as bad input (exit 2), as it does a worker count the cluster could never hold."""

    def __init__(self, problems: list[str], address: str):
        super().__init__(problems, f"Ray cluster {address}")


@dataclass
class Settings:
    address: str | None = None
    """`--address`: the cluster to join, before RAY_ADDRESS and the `ray start` cluster."""
    verbose: bool = False
    """Show Ray's logs and progress messages here too (log_to_driver)."""


SETTINGS = Settings()


def configure(*, address: str | None = None, verbose: bool = False) -> None:
    """Set, for this process's next connect(), the cluster to join and whether Ray's output is shown; unless
    `verbose`, also hide the libraries' deprecation warnings and Transformers' weight-loading bars here."""
    SETTINGS.address, SETTINGS.verbose = address, verbose
    if verbose:
        return
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def pointed_address() -> tuple[str, str] | None:
    """(address, where it came from) of the cluster the user points at, or None when there is none."""
    if SETTINGS.address:
        return SETTINGS.address, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    # What ray.init() with no address reads: the `ray start` cluster's file (never `ps`, as "auto" does).
    address = started_cluster_address()
    return (address, START_CLUSTER) if address else None


def connect(*, start: bool, namespace: str | None = None) -> bool:
    """Join the cluster the user points at; else start a private local Ray if `start`, else return False."""
    import ray

    if ray.is_initialized():
        return True
    pointed = pointed_address()
    if pointed is None and not start:
        return False
    if pointed is None:
        address: str | None = "local"
    elif pointed[1] == START_CLUSTER:
        address = None  # ray.init() finds it the same way, and then (only then) uses this machine's auth token
    else:
        address = pointed[0]
    quiet = not SETTINGS.verbose
    try:
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=not quiet,
            logging_level=logging.ERROR if quiet else logging.INFO,
        )
    except ConnectionError as error:
        assert pointed is not None  # only joining can fail to connect
        hint = "" if os.environ.get("RAY_AUTH_MODE") else "; if it uses token authentication, set RAY_AUTH_MODE=token"
        raise ClusterError([f"cannot connect (address from {pointed[1]}): {error}{hint}"], pointed[0]) from None
    if quiet:
        print(f"Ray: {describe(pointed)} (--verbose prints them here)", flush=True)
    return True


def describe(pointed: tuple[str, str] | None) -> str:
    """Which Ray this process uses, and where its logs are."""
    if pointed is not None:
        return f"joined the cluster at {pointed[0]} (from {pointed[1]}); its logs stay in the cluster's log files"
    address, logs = local_node()
    return f"started a private local instance at {address}; its logs are in {logs}"


def wait_for_resources(needs: dict[str, float], what: str, *, timeout_s: float | None = None) -> None:
    """Return once the cluster has `needs` free. Refuse at once what it could never hold, and after
    `timeout_s` (default: MADAPT_RESOURCE_WAIT_S, else 60) what other work still holds, naming both."""
    import ray

    timeout = float(os.environ.get(RESOURCE_WAIT_ENV, DEFAULT_RESOURCE_WAIT_S)) if timeout_s is None else timeout_s
    address = ray.get_runtime_context().gcs_address
    total = ray.cluster_resources()
    never = {key: need for key, need in needs.items() if need > total.get(key, 0)}
    if never:
        raise ClusterError(
            [
                f"{what} needs {need:g} {key} but the cluster has {total.get(key, 0):g} in all"
                for key, need in never.items()
            ],
            address,
        )
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources()
        short = {key: need for key, need in needs.items() if free.get(key, 0) < need}
        if not short:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    raise ClusterError(
        [
            f"{what} needs {need:g} {key} but only {free.get(key, 0):g} of the cluster's {total.get(key, 0):g} "
            f"were free for {timeout:g} s: other work holds them (Serve replicas, another job's workers); "
            "free them or add a node"
            for key, need in short.items()
        ],
        address,
    )
