"""Every shipped YAML under cluster/ and serve_configs/ is checked by the validator of the system that
will read it: Ray's cluster launcher schema (inside the ray package), Ray Serve's config models, KubeRay's
CRD schema (vendored subset); examples/cluster.yaml by madapt's `load_config` (tests/config/test_config.py
loads every example). Each validator is also shown to reject a broken copy, and the cross-file promises
(same config on laptop and cluster, entrypoints that exist, node types sized by `madapt plan`, API keys
wherever the server listens beyond loopback) are asserted."""

from __future__ import annotations

import copy
import importlib
import ipaddress
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticError

# What `ray up` runs on a config before launching anything (private, so imported in this test only).
from ray.autoscaler._private.commands import prepare_config
from ray.autoscaler._private.util import validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from madapt.config import ConfigError, load_config
from madapt.plan import GPUS, plan_for_config

ROOT = Path(__file__).resolve().parents[1]
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
KUBERAY_SCHEMA = json.loads((ROOT / "cluster/kuberay/schemas/ray.io_v1.json").read_text())
IMAGE_ROOT = "/home/ray/madapt"
"""Where cluster/Dockerfile and the launcher's file_mounts put this repository on every node."""
IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
SERVER_GPU = {"g5.xlarge": "A10G 24GB / L4 24GB", "g2-standard-8": "A10G 24GB / L4 24GB"}
TRAINER_GPU = {"p4d.24xlarge": "A100 40GB", "a2-highgpu-8g": "A100 40GB"}
KEYS_ENV = "MADAPT_API_KEYS"
"""The variable the cluster configs fill with API keys and the non-loopback serve configs name in api_keys_env."""
KEYS_SECRET = {"name": "madapt-api-keys", "key": "keys"}
KEYS_DIR = "/home/ray/.madapt"
"""Where the launchers' file_mounts put the local ~/.madapt (holding api-keys) on every node."""


def documents(*folders: str) -> list[tuple[Path, int, Any]]:
    """(file, index, document) for every YAML document found recursively under `folders`."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.y*ml")):
            for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
                found.append((path, index, document))
    return found


def kind_of(document: Any) -> str:
    if isinstance(document, dict) and str(document.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    if isinstance(document, dict) and "provider" in document and "available_node_types" in document:
        return "launcher"
    if isinstance(document, dict) and "applications" in document:
        return "serve"
    return "unknown"


ALL = documents("cluster", "serve_configs")
BY_KIND = {kind: [(p, d) for p, _, d in ALL if kind_of(d) == kind] for kind in ("launcher", "kuberay", "serve")}


def ids(items: list[tuple[Path, Any]]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p, _ in items]


def manifest(kind: str) -> dict[str, Any]:
    (document,) = [d for _, d in BY_KIND["kuberay"] if d["kind"] == kind]
    return document


def launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


# --- validators --------------------------------------------------------------------------------------


def validate_launcher(document: dict[str, Any]) -> None:
    """Ray's JSON schema, then the cross-field checks `ray up` runs after filling in defaults."""
    jsonschema.validate(document, RAY_SCHEMA)
    validate_config(prepare_config(copy.deepcopy(document)))


def validate_kuberay(document: dict[str, Any]) -> None:
    kind = document.get("kind")
    if kind not in KUBERAY_SCHEMA["$defs"]:
        raise jsonschema.ValidationError(f"kind {kind!r} is not in the vendored KubeRay schema")
    schema = {"$defs": KUBERAY_SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"}
    jsonschema.Draft202012Validator(schema).validate(document)


def unknown_keys(data: dict[str, Any], model: type[BaseModel], path: str) -> list[str]:
    return [f"{path}.{key}" for key in data if key not in model.model_fields]


def validate_serve(document: dict[str, Any]) -> None:
    """Ray Serve's ServeDeploySchema and AutoscalingConfig. Serve ignores unknown keys, so a misspelled
    option would silently fall back to its default: keys are also checked against the same models."""
    schema = ServeDeploySchema.model_validate(document)
    problems = unknown_keys(document, ServeDeploySchema, "")
    for i, app in enumerate(document["applications"]):
        problems += unknown_keys(app, ServeApplicationSchema, f"applications[{i}]")
        for j, deployment in enumerate(app.get("deployments", [])):
            where = f"applications[{i}].deployments[{j}]"
            problems += unknown_keys(deployment, DeploymentSchema, where)
            if "autoscaling_config" in deployment:
                problems += unknown_keys(deployment["autoscaling_config"], AutoscalingConfig, f"{where}.autoscaling")
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])
    if problems:
        raise ValueError(f"keys Ray Serve does not know (and would ignore): {problems}")
    for app in schema.applications:
        module = app.import_path.replace(":", ".").rpartition(".")[0]
        if module.startswith("madapt."):
            # madapt's builders validate `args:` with the ServeArgs model next to them.
            importlib.import_module(module).ServeArgs.model_validate(app.args or {})


def embedded_serve_config() -> dict[str, Any]:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def file_in_repo(path: str) -> Path:
    """Map a path on the cluster's image to this checkout."""
    return ROOT / path.removeprefix(IMAGE_ROOT + "/")


# --- every file, by the validator of its reader -----------------------------------------------------


def test_every_yaml_under_cluster_and_serve_configs_is_classified():
    unknown = [f"{p.relative_to(ROOT)}#{i}" for p, i, d in ALL if kind_of(d) == "unknown"]
    assert not unknown, f"YAML that no validator checks: {unknown}"
    assert len(BY_KIND["launcher"]) >= 2 and len(BY_KIND["kuberay"]) >= 3


@pytest.mark.parametrize(("path", "document"), BY_KIND["launcher"], ids=ids(BY_KIND["launcher"]))
def test_launcher_config_matches_rays_schema(path, document):
    validate_launcher(document)


@pytest.mark.parametrize(("path", "document"), BY_KIND["kuberay"], ids=ids(BY_KIND["kuberay"]))
def test_kuberay_manifest_matches_crd_schema(path, document):
    validate_kuberay(document)


@pytest.mark.parametrize(("path", "document"), BY_KIND["serve"], ids=ids(BY_KIND["serve"]))
def test_serve_config_matches_serve_schema(path, document):
    validate_serve(document)


def test_rayservice_serve_config_matches_serve_schema():
    validate_serve(embedded_serve_config())


def test_vendored_kuberay_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(KUBERAY_SCHEMA)


# --- each validator rejects a broken copy -----------------------------------------------------------


def set_path(document: dict[str, Any], path: list, value: Any = None, *, rename: str | None = None) -> dict:
    broken = copy.deepcopy(document)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if rename is not None:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return broken


GPU_LIMIT = ["template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"]
DEPLOYMENT = ["applications", 0, "deployments", 0]
# Each break: how to damage a valid document, and what the validator must say about it.
LAUNCHER_BREAKS = {
    "misspelled key": (
        lambda d: set_path(d, ["idle_timeout_minutes"], rename="idle_timeout_minute"),
        "'idle_timeout_minute' was unexpected",
    ),
    "string for int": (
        lambda d: set_path(d, ["available_node_types", "server", "max_workers"], "8"),
        "'8' is not of type 'integer'",
    ),
    "unknown head type": (lambda d: set_path(d, ["head_node_type"], "cpu_head"), "must be one of"),
}
KUBERAY_BREAKS = {
    ("RayCluster", "misspelled key"): (
        lambda d: set_path(d, ["spec", "workerGroupSpecs", 0, "minReplicas"], rename="minReplica"),
        "'minReplica' was unexpected",
    ),
    ("RayCluster", "string for int"): (
        lambda d: set_path(d, ["spec", "workerGroupSpecs", 1, "maxReplicas"], "8"),
        "'8' is not of type 'integer'",
    ),
    ("RayCluster", "bad GPU quantity"): (
        lambda d: set_path(d, ["spec", "workerGroupSpecs", 0, *GPU_LIMIT], "eight"),
        "'eight' does not match",
    ),
    ("RayJob", "misspelled key"): (
        lambda d: set_path(d, ["spec", "shutdownAfterJobFinishes"], rename="shutdownAfterJobFinish"),
        "'shutdownAfterJobFinish' was unexpected",
    ),
    ("RayJob", "string for bool"): (
        lambda d: set_path(d, ["spec", "shutdownAfterJobFinishes"], "yes"),
        "'yes' is not of type 'boolean'",
    ),
    ("RayService", "misspelled key"): (
        lambda d: set_path(d, ["spec", "rayClusterConfig"], rename="rayClusterSpec"),
        "'rayClusterSpec' was unexpected",
    ),
    ("RayService", "mapping for string"): (
        lambda d: set_path(d, ["spec", "serveConfigV2"], {"applications": []}),
        "is not of type 'string'",
    ),
}
SERVE_BREAKS = {
    "misspelled deployment key": (
        lambda d: set_path(d, [*DEPLOYMENT, "max_ongoing_request"], 8),
        r"would ignore.*max_ongoing_request",
    ),
    "string for int": (
        lambda d: set_path(d, [*DEPLOYMENT, "autoscaling_config", "max_replicas"], "many"),
        "max_replicas",
    ),
    "min above max": (
        lambda d: set_path(d, [*DEPLOYMENT, "autoscaling_config", "min_replicas"], 99),
        "must be greater than or equal to min_replicas",
    ),
    "unknown app arg": (
        lambda d: set_path(d, ["applications", 0, "args", "base_modle"], "x"),
        "base_modle",
    ),
}


@pytest.mark.parametrize("name", LAUNCHER_BREAKS)
def test_launcher_validation_rejects_a_broken_copy(name):
    document = launcher("aws.yaml")
    validate_launcher(document)
    damage, message = LAUNCHER_BREAKS[name]
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        validate_launcher(damage(document))


@pytest.mark.parametrize(("kind", "name"), KUBERAY_BREAKS, ids=[f"{k}-{n}" for k, n in KUBERAY_BREAKS])
def test_kuberay_validation_rejects_a_broken_copy(kind, name):
    damage, message = KUBERAY_BREAKS[kind, name]
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_kuberay(damage(manifest(kind)))


@pytest.mark.parametrize("name", SERVE_BREAKS)
def test_serve_validation_rejects_a_broken_copy(name):
    damage, message = SERVE_BREAKS[name]
    with pytest.raises((PydanticError, ValueError), match=message):
        validate_serve(damage(embedded_serve_config()))


def test_example_validation_rejects_a_broken_copy(tmp_path):
    text = (ROOT / "examples/cluster.yaml").read_text().replace("num_workers: 8", "num_worker: 8")
    (tmp_path / "broken.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"backend\.trainer\.num_worker: unknown key"):
        load_config(tmp_path / "broken.yaml")


# --- laptop and cluster run the same files ----------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def test_cluster_example_differs_from_the_local_one_only_in_resources_storage_and_base():
    local = flatten(yaml.safe_load((ROOT / "examples/multi_adapter.yaml").read_text()))
    cluster = flatten(yaml.safe_load((ROOT / "examples/cluster.yaml").read_text()))
    changed = {k for k in local.keys() | cluster.keys() if local.get(k) != cluster.get(k)}
    assert changed, "examples/cluster.yaml should differ in storage and resources"
    allowed = ("base_model", "storage.", "backend.")
    assert all(k.startswith(allowed) for k in changed), sorted(changed)


def test_rayjob_trains_then_merges_the_cluster_config_and_shuts_down():
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    steps = [shlex.split(step) for step in spec["entrypoint"].split("&&")]
    assert [Path(script).name for _, script, _ in steps] == ["train.py", "merge.py"]
    for python, script, config in steps:
        assert python == "python" and Path(script).parent.name == "jobs"
        assert file_in_repo(script).is_file(), f"RayJob entrypoint {script} is not in the repository"
        assert file_in_repo(config) == ROOT / "examples/cluster.yaml"
    assert load_config(ROOT / "examples/cluster.yaml").merge is not None


def test_rayservice_embeds_the_cluster_serve_config():
    assert embedded_serve_config() == yaml.safe_load((ROOT / "cluster/serve.yaml").read_text())


def test_cluster_serve_config_is_the_local_one_with_cluster_base_store_and_resources():
    cluster = load_config(ROOT / "examples/cluster.yaml")
    (app,) = yaml.safe_load((ROOT / "cluster/serve.yaml").read_text())["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert callable(getattr(importlib.import_module(module), attribute))
    assert file_in_repo(app["args"]["config"]) == ROOT / "examples/cluster.yaml"  # its base_model and store
    on_image = importlib.import_module(module).resolve_args(
        {**app["args"], "config": str(file_in_repo(app["args"]["config"]))}
    )
    assert (on_image.base_model, on_image.store, on_image.active) == (
        cluster.base_model,
        cluster.storage.uri,
        "coding_chat",
    )
    (local,) = yaml.safe_load((ROOT / "serve_configs/multi_adapter.yaml").read_text())["applications"]
    assert app["import_path"] == local["import_path"] and app.get("route_prefix") == local.get("route_prefix")
    serve_args = importlib.import_module(module).ServeArgs
    # Authentication is on where the server listens beyond loopback (test_serve_configs_off_loopback_...).
    resources = {"config", "base_model", "store", "dtype", "device", "torch_threads", "api_keys_env", "api_keys_file"}
    local_args = serve_args.model_validate(local.get("args", {})).model_dump(exclude=resources)
    assert serve_args.model_validate(app["args"]).model_dump(exclude=resources) == local_args
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local["deployments"]]


def test_rayservice_has_gpu_pods_for_every_autoscaled_replica():
    spec = manifest("RayService")["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    gpu_replicas = sum(
        d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_gpus"]
        for d in app["deployments"]
        if d.get("ray_actor_options", {}).get("num_gpus")
    )
    pods = spec["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in pods
    )
    assert gpu_replicas >= 1 and gpus >= gpu_replicas


def test_images_match_the_pinned_ray_and_python():
    for name in ("aws.yaml", "gcp.yaml"):
        assert launcher(name)["docker"]["image"] == IMAGE, name
    dockerfile = (ROOT / "cluster/Dockerfile").read_text()
    assert f"FROM {IMAGE}\n" in dockerfile and f" . {IMAGE_ROOT}\n" in dockerfile
    for _, document in BY_KIND["kuberay"]:
        spec = document["spec"].get("rayClusterSpec") or document["spec"].get("rayClusterConfig") or document["spec"]
        assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_node_types_fit_the_plan_for_the_cluster_example(name):
    """A CPU head, an 8-GPU trainer type from zero, a 1-GPU server type, each big enough per `madapt plan`."""
    config = launcher(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0
    assert config["file_mounts"] == {IMAGE_ROOT: ".", KEYS_DIR: "~/.madapt"}
    assert any(f'-e "{IMAGE_ROOT}[' in command for command in config["setup_commands"])

    example = load_config(ROOT / "examples/cluster.yaml")
    trainer = example.backend.trainer
    plan = plan_for_config(example)
    training = [t for t in types.values() if t["resources"].get("GPU", 0) >= trainer.num_workers]
    serving = [t for t in types.values() if t["resources"].get("GPU") == 1]
    assert len(training) == 1 and len(serving) == 1
    (train_type,), (serve_type,) = training, serving
    assert train_type["min_workers"] == 0
    for resource, amount in trainer.resources_per_worker.items():
        assert amount * trainer.num_workers <= train_type["resources"].get(resource, 0), resource
        assert resource in ("CPU", "GPU") or resource not in serve_type["resources"], resource
    server_replicas = yaml.safe_load((ROOT / "cluster/serve.yaml").read_text())["applications"][0]["deployments"][0]
    assert serve_type["max_workers"] >= server_replicas["autoscaling_config"]["max_replicas"]
    assert plan.training[16].fits(GPUS[TRAINER_GPU[instance_type(train_type)]])
    assert plan.serving[16].fits(GPUS[SERVER_GPU[instance_type(serve_type)]])


def instance_type(node_type: dict[str, Any]) -> str:
    return node_type["node_config"].get("InstanceType") or node_type["node_config"]["machineType"]


def test_kuberay_trainer_group_matches_the_cluster_example():
    trainer = load_config(ROOT / "examples/cluster.yaml").backend.trainer
    for document in (manifest("RayCluster")["spec"], manifest("RayJob")["spec"]["rayClusterSpec"]):
        assert document["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (group,) = [g for g in document["workerGroupSpecs"] if g["groupName"] == "trainer"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert group["minReplicas"] == 0 and int(limits["nvidia.com/gpu"]) == trainer.num_workers
        assert custom["madapt_train_gpu"] == trainer.resources_per_worker["madapt_train_gpu"] * trainer.num_workers
        assert trainer.resources_per_worker["CPU"] * trainer.num_workers <= float(limits["cpu"])


# --- API keys: whatever listens beyond loopback requires them, and every cluster provides them --------


def shipped_serve_configs() -> list[tuple[str, dict[str, Any]]]:
    configs = [(str(path.relative_to(ROOT)), document) for path, document in BY_KIND["serve"]]
    return [*configs, ("cluster/kuberay/rayservice.yaml#serveConfigV2", embedded_serve_config())]


def unauthenticated_apps(document: dict[str, Any]) -> list[str]:
    """Applications reachable beyond loopback whose args turn no authentication on."""
    host = ServeDeploySchema.model_validate(document).http_options.host  # Serve's default is 0.0.0.0
    if host == "localhost" or ipaddress.ip_address(host).is_loopback:
        return []
    return [
        app.get("name", f"applications[{i}]")
        for i, app in enumerate(document["applications"])
        if not ((app.get("args") or {}).get("api_keys_env") or (app.get("args") or {}).get("api_keys_file"))
    ]


SERVE_CONFIGS = shipped_serve_configs()


@pytest.mark.parametrize(("name", "document"), SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_serve_configs_off_loopback_require_api_keys_from_the_cluster_env(name, document):
    from madapt.serve.args import ServeArgs  # imports Ray Serve

    assert not unauthenticated_apps(document), f"{name} listens beyond loopback without API keys"
    for app in document["applications"]:
        args = ServeArgs.model_validate(app.get("args") or {})
        # The clusters fill only this variable (launcher start commands, KubeRay Secret).
        assert args.api_keys_env in (None, KEYS_ENV), name


def test_auth_check_rejects_a_public_config_without_keys():
    document = yaml.safe_load((ROOT / "cluster/serve.yaml").read_text())
    assert not unauthenticated_apps(document)
    del document["applications"][0]["args"]["api_keys_env"]
    assert unauthenticated_apps(document) == ["madapt"]
    assert unauthenticated_apps(set_path(document, ["http_options", "host"], "127.0.0.1")) == []
    del document["http_options"]["host"]  # Serve's default binds every address
    assert unauthenticated_apps(document) == ["madapt"]


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_kuberay_containers_get_the_api_keys_from_the_secret(kind):
    """Every container of a cluster that runs Serve may host the ingress, which reads the keys at start."""
    spec = manifest(kind)["spec"]
    spec = spec.get("rayClusterConfig") or spec
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for group in groups for c in group["template"]["spec"]["containers"]]
    assert len(containers) == len(groups)
    for container in containers:
        (env,) = [e for e in container.get("env", []) if e["name"] == KEYS_ENV]
        assert set(env) == {"name", "valueFrom"} and set(env["valueFrom"]) == {"secretKeyRef"}, container["name"]
        reference = env["valueFrom"]["secretKeyRef"]
        assert {k: reference[k] for k in KEYS_SECRET} == KEYS_SECRET, container["name"]
        # The RayService exists only to serve: its pods wait for the Secret. A RayCluster may only train;
        # its ingress refuses to start without keys.
        assert reference.get("optional", False) is (kind == "RayCluster"), container["name"]
        assert set(reference) <= {"name", "key", "optional"}, container["name"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launchers_export_the_api_keys_to_every_ray_start(name, tmp_path):
    """The file_mounts copy of ~/.madapt/api-keys becomes $MADAPT_API_KEYS before `ray start` on every node."""
    config = launcher(name)
    assert config["file_mounts"][KEYS_DIR] == "~/.madapt"
    starts = [
        command
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for command in config[key]
        if "ray start" in command
    ]
    assert len(starts) == 2
    if shutil.which("bash") is None or shutil.which("paste") is None:
        pytest.skip("needs bash and paste")
    keys_dir = tmp_path / ".madapt"
    keys_dir.mkdir()
    (keys_dir / "api-keys").write_text("# production\nsk-one\n\n  sk-two \r\n  # retired: sk-zero\nsk-three")
    for command in starts:
        prefix, _, _ = command.partition("ray start")
        assert f"{KEYS_DIR}/api-keys" in prefix
        script = prefix.replace(KEYS_DIR, str(keys_dir)) + f'printf %s "${KEYS_ENV}"'
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True)
        assert [key.strip() for key in done.stdout.split(",") if key.strip()] == ["sk-one", "sk-two", "sk-three"]
