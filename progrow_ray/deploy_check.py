"""``python -m progrow_ray.deploy_check kubernetes/*.yaml``: validate Kubernetes manifests before applying.

RayJob / RayCluster documents are validated against KubeRay v1.7.0's CRD schemas made strict (unknown
fields rejected: a misspelt field, which a cluster silently drops, fails here), plus what a schema
cannot say: submissionMode values, 0 <= minReplicas <= maxReplicas (both set), restartPolicy Never or
unset under autoscaler v2, Ray version and image tags equal to the Ray pinned in pyproject.toml. Every
document: no plaintext secret values (env values of secret-looking names, Secret objects with data),
pods run as non-root.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import yaml

from .cli import run_cli
from .core.errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "kubernetes" / "schemas"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)


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


def _ray_checks(doc: dict, name: str) -> list[str]:
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
            errors.append(f"{where}: restartPolicy {pod['restartPolicy']!r} breaks autoscaler v2 (use Never or unset)")
    for where, pod in _pod_specs(doc, name):
        for c in pod["containers"]:
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            if "ray" in image and not tag.startswith(pinned):
                errors.append(f"{where}: image {image!r} is not tagged with the pinned Ray {pinned}")
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
                    errors.append(f"{where}: env {e['name']} has a plaintext value; use valueFrom.secretKeyRef")
    return errors


def check_manifest(path: str | Path, schema_dir: str | Path = SCHEMA_DIR) -> list[str]:
    """All problems of one manifest file (possibly several documents); [] when it is fine."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: cannot read YAML ({e})"]
    errors = []
    for i, doc in enumerate(docs):
        name = f"{path}[{i}] {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("kind") in ("RayJob", "RayCluster"):
            if doc.get("apiVersion") != "ray.io/v1":
                errors.append(f"{name}: apiVersion must be ray.io/v1")
            for err in sorted(_validator(doc["kind"], str(schema_dir)).iter_errors(doc), key=lambda e: list(e.path)):
                loc = ".".join(str(p) for p in err.absolute_path) or "(root)"
                errors.append(f"{name}: {loc}: {err.message}")
            errors += _ray_checks(doc, name)
        errors += _common_checks(doc, name)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.deploy_check", description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--schema-dir", default=str(SCHEMA_DIR))
    args = parser.parse_args(argv)
    errors = [e for m in args.manifests for e in check_manifest(m, args.schema_dir)]
    for e in errors:
        print(e)
    print(f"{len(args.manifests)} manifest(s) checked, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
