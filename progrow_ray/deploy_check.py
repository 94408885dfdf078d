"""``python -m progrow_ray.deploy_check kubernetes/*.yaml cluster/*.yaml``: validate deploy files before use.

Kubernetes manifests: RayJob / RayCluster documents are validated against KubeRay v1.7.0's CRD schemas made
strict (unknown fields rejected: a misspelt field, which a cluster silently drops, fails here), plus what a
schema cannot say: submissionMode values, 0 <= minReplicas <= maxReplicas (both set), restartPolicy Never or
unset under autoscaler v2, Ray version and image tags equal to the Ray pinned in pyproject.toml; GPU pods:
nvidia.com/gpu requests == limits and a memory-backed /dev/shm smaller than the memory limit; a RayJob that
runs the pipeline: its worker groups (maxReplicas x the workers a pod holds: min(GPUs, CPUs //
ray.cpus_per_worker)) fit the preset named by the entrypoint (workers_large, + workers_small with
ray.standby) and its tau probes. Every document: no plaintext secret values (env values of secret-looking
names, Secret objects with data), pods run as non-root.

Ray cluster-launcher configs (``cluster_name`` + ``provider``): Ray's own schema (``ray/autoscaler/
ray-schema.json``), provider keys Ray reads, AWS node_config against EC2 RunInstances (botocore's model), GCP
node_config against the Compute Engine instance fields used here, GPU node types declaring resources that
match the machine (Ray's GCP provider fills in TPUs only), one GPU model among the types that can launch,
AWS ImageId an ``ami-`` id or ``resolve:ssm:`` parameter (not ``latest_dlami``), file_mounts of the checkout
filtered by .gitignore.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .cli import run_cli
from .core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = PROJECT_ROOT / "kubernetes" / "schemas"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)
GPU = "nvidia.com/gpu"
_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "m": 1e-3,
    "": 1,
}


@functools.lru_cache(maxsize=1)
def pinned_ray_version() -> str:
    for req in metadata.requires("progrow_ray") or []:
        m = re.match(r"ray(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(2)
    raise ConfigError("progrow_ray does not pin ray==X in its dependencies")


@functools.lru_cache(maxsize=4)
def _validator(kind: str, schema_dir: str):
    import jsonschema

    path = Path(schema_dir) / f"{kind.lower()}.v1.strict.schema.json"
    if not path.is_file():
        raise ConfigError(f"no schema {path}")
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def quantity(value) -> float | None:
    """A Kubernetes quantity ("88", "500m", "600Gi", "1e9") as a number; None when absent or malformed."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([KMGTPE]i|[kMGTPEm]?)\s*", str(value))
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def _pod_specs(node, where: str):
    """Every PodSpec under ``node`` (a dict with ``containers``), with its location."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for k, v in node.items():
            yield from _pod_specs(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_specs(v, f"{where}[{i}]")


def _groups(cluster: dict) -> list[tuple[str, dict, int | None]]:
    """(name, group spec, most replicas) for the head (1) and every worker group (maxReplicas)."""
    out = [("head", cluster.get("headGroupSpec") or {}, 1)]
    for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
        hi = g.get("maxReplicas")
        out.append(
            (
                f"workerGroupSpecs[{i}] ({g.get('groupName')})",
                g,
                hi if isinstance(hi, int) and not isinstance(hi, bool) else None,
            )
        )
    return out


def ray_shape(group: dict) -> dict:
    """What Ray sees in one pod of a KubeRay group: logical CPUs and GPUs (rayStartParams num-cpus /
    num-gpus, else the Ray container's limits, else its requests) and the memory limit in bytes."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    res = containers[0].get("resources") or {}
    lim, req = res.get("limits") or {}, res.get("requests") or {}

    def pick(param, key):
        if param in params:
            return quantity(params[param])
        return quantity(lim[key]) if key in lim else quantity(req.get(key))

    return {
        "cpus": pick("num-cpus", "cpu"),
        "gpus": int(pick("num-gpus", GPU) or 0),
        "memory": quantity(lim.get("memory", req.get("memory"))),
    }


def _gpu_pod_checks(cluster: dict, name: str) -> list[str]:
    """GPU pods: requests == limits for nvidia.com/gpu (Kubernetes rejects the pod otherwise) and a
    memory-backed /dev/shm (the runtime's 64 MiB default starves NCCL and pushes Ray's object store to
    disk) smaller than the memory limit it is charged to."""
    errors = []
    for where, group, _ in _groups(cluster):
        spec = (group.get("template") or {}).get("spec") or {}
        containers = spec.get("containers") or []
        if not containers:
            continue
        c = containers[0]
        res = c.get("resources") or {}
        req, lim = (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)
        where = f"{name}: {where}"
        if req is not None and lim is not None and quantity(req) != quantity(lim):
            errors.append(f"{where}: {GPU} requests ({req}) != limits ({lim}); Kubernetes rejects the pod")
        shape = ray_shape(group)
        if shape["gpus"] <= 0:
            continue
        mount = next((m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"), None)
        volume = next(
            (v for v in spec.get("volumes") or [] if mount and v.get("name") == mount.get("name")), None
        )
        empty = (volume or {}).get("emptyDir")
        if not isinstance(empty, dict) or empty.get("medium") != "Memory":
            errors.append(
                f"{where}: a GPU pod needs /dev/shm from an emptyDir with medium: Memory (the runtime's "
                "64 MiB default starves NCCL and moves Ray's object store to disk)"
            )
            continue
        size = quantity(empty.get("sizeLimit"))
        if size is not None and shape["memory"] is not None and size >= shape["memory"]:
            errors.append(
                f"{where}: /dev/shm sizeLimit {empty['sizeLimit']} is charged to the memory limit "
                f"({shape['memory'] / 2**30:g}Gi): keep it well below"
            )
    return errors


def _entrypoint_preset(entrypoint: str) -> tuple[str | None, list[str]]:
    """``--config`` and ``--set`` of a ``python -m progrow_ray.pipeline`` entrypoint; (None, []) otherwise."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError:
        return None, []
    if "progrow_ray.pipeline" not in argv:
        return None, []
    config, sets = None, []
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--config":
            config = nxt
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a == "--set" and nxt:
            sets.append(nxt)
        elif a.startswith("--set="):
            sets.append(a.split("=", 1)[1])
    return config, sets


def _capacity_checks(doc: dict, cluster: dict, name: str, preset: str | None = None) -> list[str]:
    """The preset (``--preset``, else the RayJob entrypoint's) fits the cluster: Ray Train places one worker
    (ray.cpus_per_worker CPUs, 1 GPU) per bundle and packs them, so a pod holds min(GPUs, CPUs //
    cpus_per_worker) workers. Each phase must reach its maximum workers (an elastic one asks for it from
    the start); with ray.standby phase 1 and phase 2 hold theirs at once; the tau probes need one pod of
    their shape."""
    sets: list[str] = []
    if preset is None:
        preset, sets = _entrypoint_preset(str((doc.get("spec") or {}).get("entrypoint") or ""))
    if not preset:
        return []
    path = next((b / preset for b in (Path.cwd(), PROJECT_ROOT) if (b / preset).is_file()), None)
    if path is None:
        return [f"{name}: the entrypoint's preset {preset} does not exist (the image copies jobs/ from here)"]
    from .engine.config import load_run_config
    from .orchestration.config import PipelineConfig

    try:
        cfg = load_run_config(path, sets, cls=PipelineConfig)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        return [f"{name}: the entrypoint's preset {preset}: {e}"]
    groups = _groups(cluster)
    if any(hi is None for _, _, hi in groups):
        return []  # missing or mistyped maxReplicas: reported by the replica checks / the schema
    r, errors = cfg.ray, []
    cpw = r.cpus_per_worker
    total, parts, grow = 0, [], None
    for where, group, hi in groups:
        shape = ray_shape(group)
        fit = math.floor((shape["cpus"] or 0) / cpw + 1e-9)
        if r.use_gpu:
            if shape["gpus"] <= 0:
                continue
            if fit < shape["gpus"]:
                errors.append(
                    f"{name}: {where}: {shape['gpus']} GPUs per pod but {shape['cpus'] or 0:g} CPUs hold "
                    f"only {fit} worker(s) of ray.cpus_per_worker={cpw:g} ({preset}): "
                    f"{shape['gpus'] - fit} GPU(s) per pod idle"
                )
            fit = min(fit, shape["gpus"])
        if fit and hi:
            total += hi * fit
            parts.append(f"{group.get('groupName', 'head')} {hi} x {fit}")
            grow = grow or (group.get("groupName"), fit)
    worker = f"{cpw:g} CPU" + (" + 1 GPU" if r.use_gpu else "")
    held = f"the worker groups hold at most {total} ({', '.join(parts) or 'none'})"

    def fix(need: int) -> str:
        if grow is None or grow[0] is None:
            return "add a worker group"
        return f"raise {grow[0]}'s maxReplicas by {math.ceil((need - total) / grow[1])}"

    small, large = r.small, r.large
    for key, workers in (("ray.workers_small", small), ("ray.workers_large", large)):
        if total < workers.max:
            errors.append(
                f"{name}: {preset}'s {key}={workers} asks for {workers.max} workers of {worker} but {held}: "
                f"{fix(workers.max)}, or lower {key}"
            )
    if r.standby and cfg.growth.enabled and total >= large.max and total < small.max + large.max:
        need = small.max + large.max
        errors.append(
            f"{name}: {preset} with ray.standby holds phase 1's {small.max} and phase 2's {large.max} "
            f"workers of {worker} at once, {need} in all, but {held}: {fix(need)}, or set "
            "ray.standby=false (phase 2's workers are then pre-warmed during phase 1)"
        )
    t = cfg.tune
    if (
        t.enabled
        and t.gpus_per_trial > 0
        and not any(
            hi
            and ray_shape(g)["gpus"] >= t.gpus_per_trial
            and (ray_shape(g)["cpus"] or 0) >= t.cpus_per_trial
            for _, g, hi in groups
        )
    ):
        errors.append(
            f"{name}: no group has a pod for a tau probe of {preset} "
            f"(tune.cpus_per_trial={t.cpus_per_trial:g}, tune.gpus_per_trial={t.gpus_per_trial:g})"
        )
    return errors


def _ray_checks(doc: dict, name: str, preset: str | None = None) -> list[str]:
    errors, spec = [], doc.get("spec") or {}
    pinned = pinned_ray_version()
    cluster = spec.get("rayClusterSpec") if doc["kind"] == "RayJob" else spec
    if doc["kind"] == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"{name}: spec.submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if not spec.get("entrypoint"):
            errors.append(f"{name}: spec.entrypoint is empty")
    if not cluster:
        return errors
    if str(cluster.get("rayVersion")) != pinned:
        errors.append(f"{name}: rayVersion {cluster.get('rayVersion')!r} != the pinned Ray {pinned}")
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        where = f"{name}: workerGroupSpecs[{i}] ({group.get('groupName')})"
        if lo is None or hi is None:
            errors.append(f"{where}: set both minReplicas and maxReplicas")
        elif not all(isinstance(v, int) for v in (lo, hi)):
            continue  # the schema already reports the type
        elif not (0 <= lo <= hi):
            errors.append(f"{where}: need 0 <= minReplicas ({lo}) <= maxReplicas ({hi})")
        elif group.get("replicas") is not None and not (lo <= group["replicas"] <= hi):
            errors.append(f"{where}: replicas {group['replicas']} outside [{lo}, {hi}]")
    v2 = (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    for where, pod in _pod_specs(cluster, f"{name}: spec"):
        if v2 and pod.get("restartPolicy") not in (None, "Never"):
            errors.append(
                f"{where}: restartPolicy {pod['restartPolicy']!r} breaks autoscaler v2 (use Never or unset)"
            )
    for where, pod in _pod_specs(doc, name):
        for c in pod["containers"]:
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            if "ray" in image and not tag.startswith(pinned):
                errors.append(f"{where}: image {image!r} is not tagged with the pinned Ray {pinned}")
    errors += _gpu_pod_checks(cluster, name)
    if doc["kind"] == "RayJob" or preset:
        errors += _capacity_checks(doc, cluster, name, preset)
    return errors


def _common_checks(doc: dict, name: str) -> list[str]:
    errors = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        errors.append(f"{name}: a Secret with values in a manifest; create it with kubectl instead")
    for where, pod in _pod_specs(doc, name):
        if doc.get("kind") in ("Deployment", "StatefulSet", "Job", "RayJob", "RayCluster", "Pod"):
            if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
                errors.append(f"{where}: securityContext.runAsNonRoot must be true")
        for c in pod["containers"]:
            for e in c.get("env") or []:
                if SECRET_NAME.search(str(e.get("name", ""))) and "value" in e:
                    errors.append(
                        f"{where}: env {e['name']} has a plaintext value; use valueFrom.secretKeyRef"
                    )
    return errors


# ---- Ray cluster-launcher configs (cluster/*.yaml) ---------------------------------------------------------

# Machines the launcher configs may name: (GPUs, Ray accelerator type, vCPUs, RAM GiB). Ray's AWS provider
# asks
# the EC2 API for these at `ray up`; its GCP provider fills in TPUs only. Unknown machines skip these checks.
MACHINES = {
    "p5.48xlarge": (8, "H100", 192, 2048),
    "p5e.48xlarge": (8, "H200", 192, 2048),
    "p4d.24xlarge": (8, "A100", 96, 1152),
    "p4de.24xlarge": (8, "A100", 96, 1152),
    "a3-highgpu-8g": (8, "H100", 208, 1872),
    "a3-megagpu-8g": (8, "H100", 208, 1872),
    "a2-highgpu-8g": (8, "A100", 96, 680),
    "a2-ultragpu-8g": (8, "A100", 96, 1360),
    "a2-highgpu-1g": (1, "A100", 12, 85),
    "a3-highgpu-1g": (1, "H100", 26, 234),
    "m6i.2xlarge": (0, None, 8, 32),
    "n2-standard-8": (0, None, 8, 32),
}
GCP_ACCELERATORS = {
    "nvidia-h100-80gb": "H100",
    "nvidia-h100-mega-80gb": "H100",
    "nvidia-h200-141gb": "H200",
    "nvidia-tesla-a100": "A100",
    "nvidia-a100-80gb": "A100",
    "nvidia-l4": "L4",
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-v100": "V100",
    "nvidia-b200": "B200",
}
# provider keys Ray's code reads beyond those its schema lists (the schema allows any key there)
EXTRA_PROVIDER_KEYS = {
    "aws_credentials",
    "use_external_head_ip",
    "key_pair",
    "disable_launch_config_check",
    "foreground_node_launch",
    "worker_liveness_check",
    "worker_rpc_drain",
}
# Compute Engine instance fields (instances.insert) a node_config may carry, with their JSON types; Ray adds
# sourceInstanceTemplate. The API documents `scheduling` as an object, not a list.
GCE_FIELDS = {
    "machineType": str,
    "disks": list,
    "guestAccelerators": list,
    "scheduling": dict,
    "metadata": dict,
    "labels": dict,
    "tags": dict,
    "serviceAccounts": list,
    "networkInterfaces": list,
    "minCpuPlatform": str,
    "shieldedInstanceConfig": dict,
    "reservationAffinity": dict,
    "resourcePolicies": list,
    "advancedMachineFeatures": dict,
    "confidentialInstanceConfig": dict,
    "networkPerformanceConfig": dict,
    "canIpForward": bool,
    "deletionProtection": bool,
    "description": str,
    "hostname": str,
    "sourceInstanceTemplate": str,
}
GCE_SCHEDULING = {
    "onHostMaintenance": {"MIGRATE", "TERMINATE"},
    "automaticRestart": bool,
    "preemptible": bool,
    "provisioningModel": {"STANDARD", "SPOT", "FLEX_START"},
    "instanceTerminationAction": {"STOP", "DELETE"},
    "maxRunDuration": dict,
    "terminationTime": str,
    "nodeAffinities": list,
    "minNodeCpus": int,
    "localSsdRecoveryTimeout": dict,
    "availabilityDomain": int,
    "onInstanceStopAction": dict,
}
AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")
RAY_LATEST_DLAMI = (
    "AWS Deep Learning AMI (Ubuntu 18.04) V71.0"  # ray.autoscaler._private.aws.config.DEFAULT_AMI_NAME
)


@functools.lru_cache(maxsize=1)
def _ray_launcher_schema():
    import jsonschema

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        raise ConfigError(
            "ray is not installed: its cluster schema (ray/autoscaler/ray-schema.json) is needed"
        )
    schema = json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema), set(schema["properties"]["provider"]["properties"])


@functools.lru_cache(maxsize=1)
def _run_instances_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def _check_boto(value, shape, where: str, errors: list[str]) -> None:
    """``value`` against a botocore shape: unknown fields, wrong types and values outside an enum."""
    t = shape.type_name
    if t == "structure":
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping ({shape.name})")
            return
        for k, v in value.items():
            if k not in shape.members:
                errors.append(f"{where}.{k}: not a field of EC2 {shape.name}")
            else:
                _check_boto(v, shape.members[k], f"{where}.{k}", errors)
    elif t == "list":
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list")
            return
        for i, v in enumerate(value):
            _check_boto(v, shape.member, f"{where}[{i}]", errors)
    elif t == "string":
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        elif shape.enum and value not in shape.enum:
            errors.append(f"{where}: {value!r} is not an EC2 {shape.name}")
    elif t in ("integer", "long") and (not isinstance(value, int) or isinstance(value, bool)):
        errors.append(f"{where}: expected an integer, got {value!r}")
    elif t == "boolean" and not isinstance(value, bool):
        errors.append(f"{where}: expected true/false, got {value!r}")


def _aws_node_config(cfg: dict, where: str) -> list[str]:
    errors: list[str] = []
    shape = _run_instances_shape()
    for k, v in cfg.items():
        if k == "SubnetIds":  # Ray's own key: it launches in one of these subnets
            if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                errors.append(f"{where}.SubnetIds: expected a list of subnet ids")
        elif k not in shape.members:
            errors.append(f"{where}.{k}: not a RunInstances parameter")
        else:
            _check_boto(v, shape.members[k], f"{where}.{k}", errors)
    image = str(cfg.get("ImageId", ""))
    if image.lower() in ("", "latest_dlami"):
        errors.append(
            f"{where}.ImageId: {image or '(none)'} makes Ray 2.60 use its built-in {RAY_LATEST_DLAMI!r} "
            "(CUDA 11.2, no Python >= 3.10: Ray 2.60 cannot install there); use an ami- id or "
            "resolve:ssm:/aws/service/deeplearning/ami/x86_64/<DLAMI>/latest/ami-id"
        )
    elif not (AMI_ID.fullmatch(image) or image.startswith("resolve:ssm:")):
        errors.append(f"{where}.ImageId: {image!r} is neither an ami-... id nor a resolve:ssm: parameter")
    return errors


def _gcp_node_config(cfg: dict, where: str) -> list[str]:
    errors = []
    if "machineType" not in cfg:
        return errors  # a TPU node: another API
    for k, v in cfg.items():
        if k not in GCE_FIELDS:
            errors.append(f"{where}.{k}: not a Compute Engine instance field")
        elif not isinstance(v, GCE_FIELDS[k]):
            errors.append(
                f"{where}.{k}: the Compute Engine API takes a {GCE_FIELDS[k].__name__}, "
                f"got {type(v).__name__}"
            )
    sched = cfg.get("scheduling")
    for k, v in sched.items() if isinstance(sched, dict) else ():
        allowed = GCE_SCHEDULING.get(k)
        if allowed is None:
            errors.append(f"{where}.scheduling.{k}: not a Compute Engine scheduling field")
        elif isinstance(allowed, set) and v not in allowed:
            errors.append(f"{where}.scheduling.{k}: {v!r} is not one of {sorted(allowed)}")
        elif isinstance(allowed, type) and not isinstance(v, allowed):
            errors.append(f"{where}.scheduling.{k}: expected a {allowed.__name__}")
    accs = cfg.get("guestAccelerators")
    for i, acc in enumerate(accs if isinstance(accs, list) else []):
        if not (
            isinstance(acc, dict)
            and set(acc) <= {"acceleratorType", "acceleratorCount"}
            and isinstance(acc.get("acceleratorType"), str)
            and isinstance(acc.get("acceleratorCount"), int)
        ):
            errors.append(
                f"{where}.guestAccelerators[{i}]: expected {{acceleratorType: str, acceleratorCount: int}}"
            )
    return errors


def _hardware(provider: str, cfg: dict, where: str, errors: list[str]):
    """(GPUs, accelerator, vCPUs, RAM GiB) of a node_config, None where unknown: the machine's own (table),
    else
    what GCP guestAccelerators attach; attached accelerators that contradict the machine are an error."""
    machine = cfg.get("InstanceType") if provider == "aws" else cfg.get("machineType")
    gpus, acc, vcpus, ram = MACHINES.get(str(machine), (None, None, None, None))
    accs = cfg.get("guestAccelerators") if provider == "gcp" else None
    if isinstance(accs, list) and accs and all(isinstance(a, dict) for a in accs):
        n = sum(a["acceleratorCount"] for a in accs if isinstance(a.get("acceleratorCount"), int))
        kind = GCP_ACCELERATORS.get(str(accs[0].get("acceleratorType")))
        if gpus is not None and (n != gpus or (kind and acc and kind != acc)):
            errors.append(
                f"{where}: guestAccelerators attach {n} x {accs[0].get('acceleratorType')} but {machine} "
                f"comes with {gpus} x {acc}"
            )
        if gpus is None:
            gpus, acc = n, kind
    return gpus, acc, vcpus, ram


def check_launcher_config(path: str | Path, cfg: dict | None = None) -> list[str]:
    """All problems of one Ray cluster-launcher config (``ray up`` YAML); [] when it is fine."""
    path = Path(path)
    if cfg is None:
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            return [f"{path}: cannot read YAML ({e})"]
    validator, provider_keys = _ray_launcher_schema()
    errors = [
        f"{path}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message} (Ray's cluster schema)"
        for e in sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    ]
    if errors:
        return errors
    provider = cfg["provider"]
    kind = provider["type"]
    for k in sorted(set(provider) - provider_keys - EXTRA_PROVIDER_KEYS):
        errors.append(f"{path}: provider.{k}: not a key Ray's {kind} provider reads")
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in types:
        errors.append(f"{path}: head_node_type {head!r} is not one of available_node_types")
    launchable: dict[str, str] = {}
    for name, nt in types.items():
        where = f"{path}: available_node_types.{name}"
        node_cfg, res = nt["node_config"], nt.get("resources") or {}
        if kind == "aws":
            errors += _aws_node_config(node_cfg, f"{where}.node_config")
        elif kind == "gcp":
            errors += _gcp_node_config(node_cfg, f"{where}.node_config")
        else:
            continue
        gpus, acc, vcpus, ram = _hardware(kind, node_cfg, where, errors)
        machine = node_cfg.get("InstanceType") or node_cfg.get("machineType")
        declared = res.get("GPU")
        if gpus:
            if declared is None:
                why = (
                    "Ray's GCP provider fills in TPU resources only, so GPU demand never matches this type"
                    if kind == "gcp"
                    else "Ray fills it in only where it can call the EC2 API; declared, the "
                    "config says what it launches and is checkable offline"
                )
                errors.append(
                    f"{where}: {machine} has {gpus} GPUs but resources declare none ({why}): "
                    f"resources: {{CPU: ..., GPU: {gpus}}}"
                )
            elif declared != gpus:
                errors.append(f"{where}: resources GPU: {declared} but {machine} has {gpus}")
            for key in res:
                if key.startswith("accelerator_type:") and acc and key != f"accelerator_type:{acc}":
                    errors.append(f"{where}: resources {key} but {machine} carries {acc}")
            if kind == "gcp" and "CPU" not in res:
                errors.append(
                    f"{where}: declare CPU too (Ray's GCP provider fills in nothing for GPU machines)"
                )
            sched = node_cfg.get("scheduling")
            if kind == "gcp" and not (
                isinstance(sched, dict) and sched.get("onHostMaintenance") == "TERMINATE"
            ):
                errors.append(f"{where}: GPU VMs need scheduling: {{onHostMaintenance: TERMINATE}}")
            if nt.get("max_workers", cfg.get("max_workers", 1)) > 0 and name != head:
                launchable[name] = acc or str(machine)
        elif declared and gpus == 0:
            errors.append(f"{where}: resources GPU: {declared} but {machine} has no GPU")
        if vcpus is not None and res.get("CPU", 0) > vcpus:
            errors.append(f"{where}: resources CPU: {res['CPU']} but {machine} has {vcpus} vCPUs")
        if ram is not None and res.get("memory", 0) > ram * 2**30:
            errors.append(f"{where}: resources memory {res['memory']} exceeds {machine}'s {ram} GiB")
    if len(set(launchable.values())) > 1:
        errors.append(
            f"{path}: GPU node types of different models can launch ({launchable}): the autoscaler "
            "picks by utilisation, so one phase could mix them; set max_workers: 0 on all but one model"
        )
    for remote, local in (cfg.get("file_mounts") or {}).items():
        if str(local).rstrip("/") in (".", "") and ".gitignore" not in (cfg.get("rsync_filter") or []):
            errors.append(
                f"{path}: file_mounts {remote}: {local!r} syncs the whole checkout (.venv, data/, runs/): "
                "add rsync_filter: [.gitignore]"
            )
    return errors


def is_launcher_config(doc) -> bool:
    return (
        isinstance(doc, dict)
        and "provider" in doc
        and "kind" not in doc
        and ("cluster_name" in doc or "available_node_types" in doc)
    )


def check_manifest(
    path: str | Path, schema_dir: str | Path = SCHEMA_DIR, preset: str | None = None
) -> list[str]:
    """All problems of one manifest file (possibly several documents), or of a Ray cluster-launcher config;
    [] when it is fine. ``preset``: check every RayJob / RayCluster's capacity against that preset instead
    of the RayJob entrypoint's."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: cannot read YAML ({e})"]
    if len(docs) == 1 and is_launcher_config(docs[0]):
        return check_launcher_config(path, docs[0])
    errors = []
    for i, doc in enumerate(docs):
        name = f"{path}[{i}] {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("kind") in ("RayJob", "RayCluster"):
            if doc.get("apiVersion") != "ray.io/v1":
                errors.append(f"{name}: apiVersion must be ray.io/v1")
            for err in sorted(
                _validator(doc["kind"], str(schema_dir)).iter_errors(doc), key=lambda e: list(e.path)
            ):
                loc = ".".join(str(p) for p in err.absolute_path) or "(root)"
                errors.append(f"{name}: {loc}: {err.message}")
            errors += _ray_checks(doc, name, preset)
        errors += _common_checks(doc, name)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m progrow_ray.deploy_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "manifests", nargs="+", help="Kubernetes manifests and/or Ray cluster-launcher configs"
    )
    parser.add_argument("--schema-dir", default=str(SCHEMA_DIR))
    parser.add_argument(
        "--preset",
        help="check the worker groups against this preset's phases (jobs/X.yaml) instead of the "
        "RayJob entrypoint's",
    )
    args = parser.parse_args(argv)
    if args.preset and not Path(args.preset).is_file():
        raise ConfigError(f"--preset {args.preset}: no such file")
    errors = [e for m in args.manifests for e in check_manifest(m, args.schema_dir, args.preset)]
    for e in errors:
        print(e)
    print(f"{len(args.manifests)} file(s) checked, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
