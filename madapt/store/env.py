"""The object-storage environment, forwarded to the Ray processes madapt starts (actors, Train workers, Serve
replicas): a Ray worker inherits the environment of the node it runs on, not of the driver that asked for it."""

from __future__ import annotations

import os
from typing import Any

STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "STORAGE_EMULATOR_HOST",
)
"""Variables that tell pyarrow, boto3 and google-cloud-storage where the object store is and who we are."""


def storage_env() -> dict[str, str]:
    """This process's object-storage variables (STORAGE_ENV), to hand to the Ray processes madapt starts.

    A Ray worker inherits the environment of the node it runs on, not of the driver that asked for it, so a
    store reached through the driver's AWS_ENDPOINT_URL or keys would be out of the workers' reach. Ray
    Train forwards its own variables the same way (`get_env_vars_to_propagate`)."""
    return {key: os.environ[key] for key in STORAGE_ENV if key in os.environ}


def storage_runtime_env() -> dict[str, Any]:
    """A Ray `runtime_env` carrying storage_env() (empty when there is nothing to forward)."""
    env = storage_env()
    return {"env_vars": env} if env else {}
