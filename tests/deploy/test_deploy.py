import copy
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from progrow_ray.deploy_check import check_manifest, pinned_ray_version
from progrow_ray.engine.config import load_run_config
from progrow_ray.orchestration.config import PipelineConfig
from progrow_ray.plan import plan

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "kubernetes"
PRESETS = sorted((ROOT / "jobs").glob("*.yaml"))
RAYJOB = K8S / "rayjob.yaml"


def test_pinned_ray_version_is_the_installed_one():
    import ray

    assert pinned_ray_version() == ray.__version__ == "2.60.0"


@pytest.mark.parametrize("manifest", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_pass_the_project_check(manifest):
    assert check_manifest(manifest) == []


def test_check_jsonschema_cli_accepts_the_rayjob():
    exe = Path(sys.executable).parent / "check-jsonschema"
    for kind in ("rayjob", "raycluster"):
        p = subprocess.run([str(exe), "--schemafile", str(K8S / "schemas" / f"{kind}.v1.strict.schema.json"),
                            str(K8S / f"{kind}.yaml")], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


def _group(d):
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_pod(d):
    return _group(d)["template"]["spec"]


MUTATIONS = [
    ("misspelt field", lambda d: _group(d).__setitem__("maxReplica", 8), "Additional properties"),
    ("misspelt nested field", lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "Additional properties"),
    ("bad submission mode", lambda d: d["spec"].__setitem__("submissionMode", "K8sJob"), "submissionMode"),
    ("min > max", lambda d: _group(d).update(minReplicas=5, maxReplicas=2), "minReplicas (5) <= maxReplicas (2)"),
    ("negative min", lambda d: _group(d).update(minReplicas=-1), "0 <= minReplicas (-1)"),
    ("no maxReplicas", lambda d: _group(d).pop("maxReplicas"), "set both minReplicas and maxReplicas"),
    ("restartPolicy", lambda d: _worker_pod(d).__setitem__("restartPolicy", "Always"), "autoscaler v2"),
    ("plaintext secret", lambda d: _worker_pod(d)["containers"][0]["env"].__setitem__(
        1, {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "plaintext value"),
    ("image tag", lambda d: _worker_pod(d)["containers"][0].__setitem__("image", "rayproject/ray:2.59.0-gpu"),
     "not tagged with the pinned Ray"),
    ("ray version", lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.9.0"), "rayVersion"),
    ("root pods", lambda d: _worker_pod(d).pop("securityContext"), "runAsNonRoot"),
    ("wrong type", lambda d: _group(d).__setitem__("maxReplicas", "eight"), "maxReplicas"),
]


@pytest.mark.parametrize("name,mutate,message", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_broken_rayjob_fails_the_project_check(tmp_path, name, mutate, message):
    doc = copy.deepcopy(yaml.safe_load(RAYJOB.read_text()))
    mutate(doc)
    bad = tmp_path / "rayjob.yaml"
    bad.write_text(yaml.safe_dump(doc))
    errors = check_manifest(bad)
    assert any(message in e for e in errors), errors


def test_deploy_check_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "progrow_ray.deploy_check", *map(str, K8S.glob("*.yaml"))],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    doc = yaml.safe_load(RAYJOB.read_text())
    doc["spec"]["entrypont"] = "typo"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    bad = subprocess.run([sys.executable, "-m", "progrow_ray.deploy_check", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "'entrypont' was unexpected" in bad.stdout


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_validates_and_plans(preset):
    head = preset.read_text().splitlines()[0]
    assert head.startswith(f"# {preset.stem}:"), "each preset is documented at its top"
    cfg = load_run_config(preset, [], cls=PipelineConfig)
    assert cfg.name == preset.stem
    p = plan(cfg, [0.5, 0.8], "h100", 0.4, None)
    assert p["rows"][0]["flops_fraction"] < 1 and p["rows"][1]["gpu_hours"] < p["rows"][0]["gpu_hours"]


def test_paper_presets_match_appendix_b():
    heads = {"gpt2-124m": (12, 12), "gpt2-24l": (24, 16), "gpt2-36l": (36, 20), "gpt2-7b-60l": (60, 48)}
    for name, (layers, n_head) in heads.items():
        cfg = load_run_config(ROOT / "jobs" / f"{name}.yaml", [], cls=PipelineConfig).target_model_config()
        assert (cfg.n_layer, cfg.n_head, cfg.head_dim) == (layers, n_head, 64)
    f1 = load_run_config(ROOT / "jobs" / "gpt2-124m.yaml", [], cls=PipelineConfig)
    assert (f1.optimizer.lr, f1.schedule.warmup_frac, f1.schedule.decay_frac, f1.data.seq_len) == (0.01, 0.02, 0.1, 1024)
    moe = load_run_config(ROOT / "jobs" / "moe-12l.yaml", [], cls=PipelineConfig).target_model_config()
    assert moe.n_experts == 8 and moe.aux_loss_weight > 0 and moe.z_loss_weight > 0


def test_plan_cli_prints_the_cost_table():
    p = subprocess.run([sys.executable, "-m", "progrow_ray.plan", "jobs/gpt2-7b-60l.yaml", "--t-mix", "5000000000"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\s+0\.80 .*x", p.stdout, re.M) and "GPU-hours" in p.stdout and "expand at tau" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "progrow_ray.plan", "jobs/gpt2-7b-60l.yaml", "--gpu", "tpu"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpu")


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs(launcher):
    text = (ROOT / "cluster" / launcher).read_text()
    cfg = yaml.safe_load(text)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)
    assert any(f"ray[default,train,tune]=={pinned_ray_version()}" in c for c in cfg["setup_commands"])
    for preset in re.findall(r"jobs/[\w.-]+\.yaml", text):
        assert (ROOT / preset).is_file(), preset


@pytest.mark.cluster
def test_local_cluster_script_starts_and_stops_exactly_its_processes(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PROGROW_LOCAL_CLUSTER_DIR": str(tmp_path / "st"),
           "GCS_PORT": "6397", "DASH_PORT": "8297", "CPUS": "1", "HOME": str(tmp_path)}
    script = str(ROOT / "cluster" / "local.sh")
    start = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        status = subprocess.run(["bash", script, "status"], env=env, capture_output=True, text=True)
        assert "head: running" in status.stdout
        pid = int((tmp_path / "st" / "head.pid").read_text())
        assert len(live_in_group(pid)) > 1  # the head and the Ray processes it spawned
    finally:
        stop = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    time.sleep(1)
    assert live_in_group(pid) == []  # none left (exited children may linger as zombies of a non-reaping init)


def live_in_group(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split() and not line.split()[1].startswith("Z")]
