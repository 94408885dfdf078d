"""Security: safe checkpoint loading even when the manifest is forged, secrets in the environment only
(never in MLflow or logs), loopback-only local servers, Kubernetes secrets by reference."""

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from progrow_ray.engine.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_checkpoint_cannot_run_code(tmp_path):
    """An attacker who can write the bucket can also recompute the manifest's sha256; weights_only=True
    is what stops the pickle from running code."""
    uri = write_checkpoint(
        str(tmp_path / "ck"), {"model.pt": {"w": torch.ones(2)}, "state.json": {"step": 1}}
    )
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": Exploit(marker)}, evil)
    data = evil.read_bytes()
    (Path(uri) / "model.pt").write_bytes(data)
    manifest = json.loads((Path(uri) / "manifest.json").read_text())
    manifest["files"]["model.pt"] = hashlib.sha256(data).hexdigest()  # forged: the checksum matches
    (Path(uri) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((CheckpointError, Exception)) as err:
        read_checkpoint(uri)
    assert (
        "Weights only load failed" in str(err.value)
        or "weights_only" in str(err.value)
        or isinstance(err.value, CheckpointError)
    )
    assert not marker.exists()  # the payload never ran


def test_every_torch_load_is_weights_only():
    loads = []
    for path in (ROOT / "progrow_ray").rglob("*.py"):
        loads += [
            (path.name, line)
            for line in path.read_text().splitlines()
            if re.search(r"torch\.load\(", line) and not line.lstrip().startswith(("#", "is ", "``"))
        ]
    assert loads and all("weights_only=True" in line for _, line in loads), loads


def test_local_servers_bind_loopback_only():
    """Code that starts servers here (Ray dashboard, MLflow UI hint, moto in tests) names 127.0.0.1;
    0.0.0.0 appears only in Kubernetes manifests, where pods must accept their Service's traffic."""
    offenders = []
    for path in [
        *(ROOT / "progrow_ray").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        ROOT / "cluster" / "local.sh",
        ROOT / "Makefile",
        ROOT / "README.md",
    ]:
        text = path.read_text()
        if "0.0.0.0" in text and path.name != "test_security.py":
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
    orchestration = ROOT / "progrow_ray" / "orchestration"
    assert (
        'dashboard_host="127.0.0.1"' in (orchestration / "cluster.py").read_text()
    )  # RaySession's local cluster
    assert "--host 127.0.0.1" in (orchestration / "job.py").read_text()  # the MLflow UI command we print
    assert "127.0.0.1" in (ROOT / "cluster" / "local.sh").read_text()


def listen_addresses(port: int) -> list[str]:
    """IPv4/IPv6 addresses with a listening TCP socket on ``port``, read from /proc/net/tcp{,6}."""
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:
                continue
            if v6:
                out.append(
                    "::1"
                    if addr == "0" * 31 + "1" or addr.endswith("0100007F")
                    else ("::" if set(addr) == {"0"} else addr)
                )
            else:
                out.append(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


@pytest.mark.cluster
def test_local_ray_dashboard_listens_on_loopback(tmp_path):
    import ray

    from progrow_ray.engine.config import load_run_config
    from progrow_ray.orchestration.cluster import RaySession
    from progrow_ray.orchestration.config import PipelineConfig

    cfg = load_run_config(ROOT / "tests" / "orchestration" / "tiny.yaml", [], cls=PipelineConfig)
    with RaySession(None, cfg.ray.local_cpus, log=lambda _: None) as session:
        assert session.local
        url = ray.get_runtime_context().gcs_address
        dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
        assert dashboard.startswith("127.0.0.1:"), dashboard
        port = int(dashboard.rsplit(":", 1)[1])
        deadline = time.time() + 30
        while True:
            listening = listen_addresses(port)
            if listening or time.time() > deadline:
                break
            time.sleep(0.5)
        assert listening and all(ip in ("127.0.0.1", "::1") for ip in listening), (url, listening)
    assert not ray.is_initialized()  # the session shut down the cluster it started


def test_manifests_take_credentials_by_secret_reference():
    docs = [
        d
        for f in sorted((ROOT / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    env_entries = []

    def walk(node):
        if isinstance(node, dict):
            if "env" in node and isinstance(node["env"], list):
                env_entries.extend(node["env"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    secret = [
        e
        for e in env_entries
        if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        or any(w in e["name"] for w in ("PASSWORD", "TOKEN", "SECRET"))
    ]
    assert secret and all("secretKeyRef" in e.get("valueFrom", {}) and "value" not in e for e in secret), (
        secret
    )


def test_secrets_never_reach_mlflow_or_the_log(tmp_path, text_corpus, prepared):
    """A whole pipeline with the S3 secret and an MLflow password in the environment: no MLflow param,
    tag, metric key or artifact, no file of the run, and no line the pipeline prints, contains them."""
    from mlflow.tracking import MlflowClient

    from ..orchestration.test_pipeline import ENV, pipeline_cmd

    secret = "sEcReT-d41d8cd98f00b204e9800998ecf8427e"
    env = {
        **ENV,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ACCESS_KEY_ID": "AKIA-TEST",
        "MLFLOW_TRACKING_PASSWORD": secret,
    }
    out = tmp_path / "out"
    cmd = pipeline_cmd(
        text_corpus, prepared, out, "--set", "tune.enabled=false", "--set", "baseline.enabled=false"
    )
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert secret not in p.stdout + p.stderr
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exps = client.search_experiments()
    assert exps
    runs = [r for e in exps for r in client.search_runs([e.experiment_id])]
    assert len(runs) >= 3
    for r in runs:
        blob = json.dumps([r.data.params, r.data.tags, list(r.data.metrics)])
        assert secret not in blob
        for a in client.list_artifacts(r.info.run_id):
            local = Path(client.download_artifacts(r.info.run_id, a.path, str(tmp_path / "dl")))
            for f in [local] if local.is_file() else [f for f in local.rglob("*") if f.is_file()]:  # images/
                assert secret.encode() not in f.read_bytes(), f
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".yaml", ".log", ".jsonl", ".txt"):
            assert secret not in f.read_text(errors="ignore"), f
