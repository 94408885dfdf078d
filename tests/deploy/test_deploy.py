import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from progrow_ray import deploy_check
from progrow_ray.deploy_check import check_manifest, pinned_ray_version
from progrow_ray.engine.config import load_run_config
from progrow_ray.orchestration.config import PipelineConfig
from progrow_ray.orchestration.preflight import check_memory
from progrow_ray.plan import plan

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "kubernetes"
PRESETS = sorted((ROOT / "jobs").glob("*.yaml"))
RAYJOB = K8S / "rayjob.yaml"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
GPU_PRESETS = [p for p in PRESETS if yaml.safe_load(p.read_text()).get("ray", {}).get("use_gpu")]


def test_pinned_ray_version_is_the_installed_one():
    import ray

    assert pinned_ray_version() == ray.__version__ == "2.60.0"


@pytest.mark.parametrize("manifest", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_pass_the_project_check(manifest):
    assert check_manifest(manifest) == []


def test_check_jsonschema_cli_accepts_the_rayjob():
    exe = Path(sys.executable).parent / "check-jsonschema"
    for kind in ("rayjob", "raycluster"):
        p = subprocess.run(
            [
                str(exe),
                "--schemafile",
                str(K8S / "schemas" / f"{kind}.v1.strict.schema.json"),
                str(K8S / f"{kind}.yaml"),
            ],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stdout + p.stderr


def _group(d):
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_pod(d):
    return _group(d)["template"]["spec"]


def _resources(d):
    return _worker_pod(d)["containers"][0]["resources"]


MUTATIONS = [
    ("misspelt field", lambda d: _group(d).__setitem__("maxReplica", 8), "Additional properties"),
    (
        "misspelt nested field",
        lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),
        "Additional properties",
    ),
    ("bad submission mode", lambda d: d["spec"].__setitem__("submissionMode", "K8sJob"), "submissionMode"),
    (
        "min > max",
        lambda d: _group(d).update(minReplicas=5, maxReplicas=2),
        "minReplicas (5) <= maxReplicas (2)",
    ),
    ("negative min", lambda d: _group(d).update(minReplicas=-1), "0 <= minReplicas (-1)"),
    ("no maxReplicas", lambda d: _group(d).pop("maxReplicas"), "set both minReplicas and maxReplicas"),
    ("restartPolicy", lambda d: _worker_pod(d).__setitem__("restartPolicy", "Always"), "autoscaler v2"),
    (
        "plaintext secret",
        lambda d: _worker_pod(d)["containers"][0]["env"].__setitem__(
            1, {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}
        ),
        "plaintext value",
    ),
    (
        "image tag",
        lambda d: _worker_pod(d)["containers"][0].__setitem__("image", "rayproject/ray:2.59.0-gpu"),
        "not tagged with the pinned Ray",
    ),
    ("ray version", lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.9.0"), "rayVersion"),
    ("root pods", lambda d: _worker_pod(d).pop("securityContext"), "runAsNonRoot"),
    ("wrong type", lambda d: _group(d).__setitem__("maxReplicas", "eight"), "maxReplicas"),
    (
        "gpu request != limit",
        lambda d: _resources(d)["requests"].__setitem__("nvidia.com/gpu", "4"),
        "requests (4) != limits (8)",
    ),
    ("no /dev/shm", lambda d: _worker_pod(d).pop("volumes"), "/dev/shm from an emptyDir with medium: Memory"),
    (
        "/dev/shm on disk",
        lambda d: _worker_pod(d)["volumes"][0].__setitem__("emptyDir", {}),
        "medium: Memory",
    ),
    (
        "/dev/shm >= memory",
        lambda d: _worker_pod(d)["volumes"][0]["emptyDir"].__setitem__("sizeLimit", "600Gi"),
        "charged to the memory limit",
    ),
    (
        "CPUs strand GPUs",
        lambda d: [_resources(d)[k].__setitem__("cpu", "32") for k in ("requests", "limits")],
        "8 GPUs per pod but 32 CPUs hold only 4 worker(s) of ray.cpus_per_worker=8",
    ),
    (
        "too few GPUs",
        lambda d: [g.update(maxReplicas=1) for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"]],
        "with ray.standby holds phase 1's 2 and phase 2's 8 workers of 8 CPU + 1 GPU at once, 10 in all",
    ),
    (
        "an elastic maximum out of reach",
        lambda d: d["spec"].__setitem__(
            "entrypoint",
            d["spec"]["entrypoint"] + " --set ray.workers_large=[8,32] --set ray.cpus_per_worker=32",
        ),
        "ray.workers_large=8-32 asks for 32 workers of 32 CPU + 1 GPU but the worker groups hold at most 16 "
        "(gpu-h100x8 8 x 2): raise gpu-h100x8's maxReplicas by 8",
    ),
    (
        "no probe pod",
        lambda d: d["spec"].__setitem__(
            "entrypoint", d["spec"]["entrypoint"] + " --set tune.cpus_per_trial=128"
        ),
        "no group has a pod for a tau probe",
    ),
    (
        "missing preset",
        lambda d: d["spec"].__setitem__(
            "entrypoint", "python -m progrow_ray.pipeline --config jobs/nope.yaml"
        ),
        "jobs/nope.yaml does not exist",
    ),
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
    files = [*map(str, K8S.glob("*.yaml")), *(str(ROOT / "cluster" / n) for n in LAUNCHERS)]
    ok = subprocess.run(
        [sys.executable, "-m", "progrow_ray.deploy_check", *files], capture_output=True, text=True, cwd=ROOT
    )
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    doc = yaml.safe_load(RAYJOB.read_text())
    doc["spec"]["entrypont"] = "typo"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    bad = subprocess.run(
        [sys.executable, "-m", "progrow_ray.deploy_check", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and "'entrypont' was unexpected" in bad.stdout


def test_deploy_check_preset_checks_every_cluster_against_a_presets_phases(tmp_path):
    """``--preset``: the RayCluster as well as the RayJob, against that preset's worker ranges and standby."""
    manifests = [str(K8S / "raycluster.yaml"), str(RAYJOB)]
    for preset in GPU_PRESETS:  # the shipped clusters hold every GPU preset
        ok = subprocess.run(
            [sys.executable, "-m", "progrow_ray.deploy_check", "--preset", str(preset), *manifests],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert ok.returncode == 0 and "0 problem(s)" in ok.stdout, ok.stdout
    big = yaml.safe_load((ROOT / "jobs" / "gpt2-124m.yaml").read_text())
    big["ray"].update(workers_small=[8, 16], workers_large=[8, 64])  # 16 + 64 with standby > 72
    big["train"]["micro_batch"] = 1  # a micro-batch for each of 64 workers
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "progrow_ray.deploy_check",
            "--preset",
            str(tmp_path / "big.yaml"),
            *manifests,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and bad.stdout.count("holds phase 1's 16 and phase 2's 64 workers") == 2
    assert "raise gpu-h100x8's maxReplicas by 1, or set ray.standby=false" in bad.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "progrow_ray.deploy_check", "--preset", "jobs/nope.yaml", *manifests],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        missing.returncode == 2 and missing.stderr.strip() == "error: --preset jobs/nope.yaml: no such file"
    )


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_validates_and_plans(preset):
    head = preset.read_text().splitlines()[0]
    assert head.startswith(f"# {preset.stem}:"), "each preset is documented at its top"
    cfg = load_run_config(preset, [], cls=PipelineConfig)
    assert cfg.name == preset.stem
    p = plan(cfg, [0.5, 0.8], "h100", 0.4, None)
    assert p["rows"][0]["flops_fraction"] < 1 and p["rows"][1]["gpu_hours"] < p["rows"][0]["gpu_hours"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_passes_the_memory_preflight_at_its_gpu_counts(preset):
    """Every phase fits ray.gpu_memory_gb (80) under the mode train.parallel=auto gives it: the 7B model's
    phase 2 under fsdp, the rest under ddp."""
    cfg = load_run_config(preset, [], cls=PipelineConfig)
    rows = check_memory(cfg)
    assert rows and all(r.chosen.total <= cfg.ray.gpu_memory_gb * 1e9 for r in rows)
    expected = {"phase 2": "fsdp"} if preset.stem == "gpt2-7b-60l" else {}
    assert {r.phase: r.mode for r in rows if r.mode == "fsdp"} == expected


def test_paper_presets_match_appendix_b():
    heads = {"gpt2-124m": (12, 12), "gpt2-24l": (24, 16), "gpt2-36l": (36, 20), "gpt2-7b-60l": (60, 48)}
    for name, (layers, n_head) in heads.items():
        cfg = load_run_config(ROOT / "jobs" / f"{name}.yaml", [], cls=PipelineConfig).target_model_config()
        assert (cfg.n_layer, cfg.n_head, cfg.head_dim) == (layers, n_head, 64)
    f1 = load_run_config(ROOT / "jobs" / "gpt2-124m.yaml", [], cls=PipelineConfig)
    assert (f1.optimizer.lr, f1.schedule.warmup_frac, f1.schedule.decay_frac, f1.data.seq_len) == (
        0.01,
        0.02,
        0.1,
        1024,
    )
    moe = load_run_config(ROOT / "jobs" / "moe-12l.yaml", [], cls=PipelineConfig).target_model_config()
    assert moe.n_experts == 8 and moe.aux_loss_weight > 0 and moe.z_loss_weight > 0


def test_plan_cli_prints_the_cost_table():
    p = subprocess.run(
        [sys.executable, "-m", "progrow_ray.plan", "jobs/gpt2-7b-60l.yaml", "--t-mix", "5000000000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    assert (
        re.search(r"^\s+0\.80 .*x", p.stdout, re.M)
        and "GPU-hours" in p.stdout
        and "expand at tau" in p.stdout
    )
    assert re.search(r"^phase 2 +60 +64 fsdp .* <- runs$", p.stdout, re.M), p.stdout
    assert re.search(r"^phase 2 +60 +64 ddp .*\(over the limit\)$", p.stdout, re.M)
    bad = subprocess.run(
        [sys.executable, "-m", "progrow_ray.plan", "jobs/gpt2-7b-60l.yaml", "--gpu", "tpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpu")


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs(launcher):
    text = (ROOT / "cluster" / launcher).read_text()
    cfg = yaml.safe_load(text)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu and all(t["min_workers"] == 0 for t in gpu) and any(t["max_workers"] > 0 for t in gpu)
    assert any(f"ray[default,train,tune]=={pinned_ray_version()}" in c for c in cfg["setup_commands"])
    for preset in re.findall(r"jobs/[\w.-]+\.yaml", text):
        assert (ROOT / preset).is_file(), preset


# ---- Ray cluster-launcher configs --------------------------------------------------------------------------

# What each machine carries (GPUs, Ray accelerator type, vCPUs), from the providers' machine-type pages; kept
# apart from deploy_check's own table so a wrong entry there cannot hide a wrong config here.
HARDWARE = {
    "p5.48xlarge": (8, "H100", 192),
    "p4d.24xlarge": (8, "A100", 96),
    "a3-highgpu-8g": (8, "H100", 208),
    "a2-highgpu-8g": (8, "A100", 96),
}


def _launcher(name):
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def _gpu_types(cfg):
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_config_passes_rays_schema_and_the_project_check(launcher):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher(launcher)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(
        cfg
    )  # the file as written: no unknown top-level / node-type keys
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs: merged with Ray's defaults.yaml
    # what the schema leaves open (provider keys, node_config, resources, images) is deploy_check's
    assert deploy_check.check_launcher_config(ROOT / "cluster" / launcher) == []
    assert check_manifest(ROOT / "cluster" / launcher) == []  # the CLI's entry point dispatches to it


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_gpu_types_declare_their_gpus_and_fit_every_preset(launcher):
    cfg = _launcher(launcher)
    launchable = {}
    for name, t in _gpu_types(cfg).items():
        nc = t["node_config"]
        gpus, acc, vcpus = HARDWARE[nc.get("InstanceType") or nc.get("machineType")]
        res = t["resources"]
        # Ray's GCP provider fills in TPU resources only: without GPU here, GPU demand never matches the type
        assert res.get("GPU") == gpus and res.get(f"accelerator_type:{acc}") == 1, (name, res)
        assert 0 < res.get("CPU", 0) <= vcpus, (name, res)
        if "guestAccelerators" in nc:
            assert sum(a["acceleratorCount"] for a in nc["guestAccelerators"]) == gpus
            assert nc["scheduling"] == {"onHostMaintenance": "TERMINATE", "automaticRestart": True}
        if t["max_workers"] > 0:
            launchable[name] = (acc, gpus, t["max_workers"])
    # one GPU model can launch: the autoscaler prefers whichever wastes fewer vCPUs, so two would mix in a
    # phase
    assert len({acc for acc, _, _ in launchable.values()}) == 1, launchable
    capacity = sum(g * n for _, g, n in launchable.values())
    assert sum(n for _, _, n in launchable.values()) <= cfg["max_workers"]
    for preset in GPU_PRESETS:
        r = load_run_config(preset, [], cls=PipelineConfig).ray
        assert r.large.max + r.small.max <= capacity, preset.stem  # phase 2 + standby phase 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_syncs_the_checkout_without_venv_and_data(launcher):
    cfg = _launcher(launcher)
    assert cfg["file_mounts"] == {"~/progrow_ray": "."} and cfg["rsync_filter"] == [".gitignore"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "/data/", "/runs/", "/out/", "mlflow.db"} <= set(ignored)


def test_aws_images_are_a_current_dlami_not_rays_builtin_default():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI_NAME

    # latest_dlami (or no ImageId) makes Ray 2.60 launch this: Ubuntu 18.04, CUDA 11.2; Ray 2.60 needs
    # Python 3.10
    assert DEFAULT_AMI_NAME == deploy_check.RAY_LATEST_DLAMI and "18.04" in DEFAULT_AMI_NAME
    dlami = (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
        "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
    )
    for name, t in _launcher("aws.yaml")["available_node_types"].items():
        image = t["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or image == dlami, name


def _set(path):
    def mutate(cfg, value):
        *keys, last = path
        node = cfg
        for k in keys:
            node = node[k]
        if value is None:
            node.pop(last)
        else:
            node[last] = value

    return mutate


LAUNCHER_MUTATIONS = [
    ("aws.yaml", "misspelt top-level key", _set(["idle_timeout_minute"]), 5, "Additional properties"),
    (
        "aws.yaml",
        "misspelt node-type key",
        _set(["available_node_types", "gpu-p5", "max_worker"]),
        2,
        "Additional properties",
    ),
    (
        "aws.yaml",
        "misspelt provider key",
        _set(["provider", "availabilty_zone"]),
        "us-east-1a",
        "provider.availabilty_zone: not a key",
    ),
    (
        "aws.yaml",
        "misspelt RunInstances field",
        _set(["available_node_types", "gpu-p5", "node_config", "InstanceTyp"]),
        "p5.48xlarge",
        "InstanceTyp: not a RunInstances parameter",
    ),
    (
        "aws.yaml",
        "unknown instance type",
        _set(["available_node_types", "gpu-p5", "node_config", "InstanceType"]),
        "p5.48xlarg",
        "'p5.48xlarg' is not an EC2 InstanceType",
    ),
    (
        "aws.yaml",
        "nested RunInstances field",
        _set(["available_node_types", "head", "node_config", "BlockDeviceMappings"]),
        [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSiz": 200}}],
        "VolumeSiz: not a field of EC2",
    ),
    (
        "aws.yaml",
        "latest_dlami",
        _set(["available_node_types", "gpu-p5", "node_config", "ImageId"]),
        "latest_dlami",
        "Ubuntu 18.04",
    ),
    (
        "aws.yaml",
        "no ImageId",
        _set(["available_node_types", "head", "node_config", "ImageId"]),
        None,
        "Ubuntu 18.04",
    ),
    (
        "aws.yaml",
        "made-up image",
        _set(["available_node_types", "head", "node_config", "ImageId"]),
        "resolve-latest-dlami",
        "neither an ami-... id nor a resolve:ssm: parameter",
    ),
    (
        "aws.yaml",
        "GPUs undeclared",
        _set(["available_node_types", "gpu-p5", "resources"]),
        {},
        "declare none",
    ),
    (
        "aws.yaml",
        "wrong GPU count",
        _set(["available_node_types", "gpu-p5", "resources", "GPU"]),
        4,
        "GPU: 4 but p5.48xlarge has 8",
    ),
    (
        "aws.yaml",
        "wrong accelerator",
        _set(["available_node_types", "gpu-p5", "resources", "accelerator_type:A100"]),
        1,
        "accelerator_type:A100 but p5.48xlarge carries H100",
    ),
    (
        "aws.yaml",
        "two GPU models",
        _set(["available_node_types", "gpu-p4d", "max_workers"]),
        4,
        "GPU node types of different models can launch",
    ),
    ("aws.yaml", "unfiltered file mount", _set(["rsync_filter"]), None, "syncs the whole checkout"),
    (
        "gcp.yaml",
        "GPUs undeclared",
        _set(["available_node_types", "gpu-a3", "resources"]),
        {},
        "fills in TPU resources only",
    ),
    (
        "gcp.yaml",
        "CPUs undeclared",
        _set(["available_node_types", "gpu-a3", "resources"]),
        {"GPU": 8},
        "declare CPU",
    ),
    (
        "gcp.yaml",
        "too many CPUs",
        _set(["available_node_types", "gpu-a3", "resources", "CPU"]),
        416,
        "CPU: 416 but a3-highgpu-8g has 208 vCPUs",
    ),
    (
        "gcp.yaml",
        "accelerators disagree",
        _set(["available_node_types", "gpu-a3", "node_config", "guestAccelerators"]),
        [{"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 4}],
        "attach 4 x nvidia-h100-80gb but a3-highgpu-8g",
    ),
    (
        "gcp.yaml",
        "wrong accelerator",
        _set(["available_node_types", "gpu-a3", "node_config", "guestAccelerators"]),
        [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 8}],
        "comes with 8 x H100",
    ),
    (
        "gcp.yaml",
        "scheduling as a list",
        _set(["available_node_types", "gpu-a3", "node_config", "scheduling"]),
        [{"onHostMaintenance": "TERMINATE"}],
        "takes a dict, got list",
    ),
    (
        "gcp.yaml",
        "live migration",
        _set(["available_node_types", "gpu-a3", "node_config", "scheduling"]),
        {"onHostMaintenance": "MIGRATE"},
        "GPU VMs need scheduling: {onHostMaintenance: TERMINATE}",
    ),
    (
        "gcp.yaml",
        "misspelt instance field",
        _set(["available_node_types", "gpu-a3", "node_config", "guestAccelerator"]),
        [],
        "guestAccelerator: not a Compute Engine instance field",
    ),
    (
        "gcp.yaml",
        "resources as strings",
        _set(["available_node_types", "gpu-a3", "resources", "GPU"]),
        "8",
        "Ray's cluster schema",
    ),
]


@pytest.mark.parametrize(
    "launcher,name,mutate,value,message",
    LAUNCHER_MUTATIONS,
    ids=[f"{m[0][:3]}: {m[1]}" for m in LAUNCHER_MUTATIONS],
)
def test_broken_launcher_config_fails_the_project_check(tmp_path, launcher, name, mutate, value, message):
    cfg = _launcher(launcher)
    mutate(cfg, value)
    bad = tmp_path / launcher
    bad.write_text(yaml.safe_dump(cfg))
    errors = check_manifest(bad)
    assert any(message in e for e in errors), errors


# ---- the image's build context -----------------------------------------------------------------------------


def _dockerignore_rules(text):
    """.dockerignore as Docker reads it: one pattern a line, `#` comments, `!` re-includes, leading `/` and
    trailing `/` dropped, `*` and `?` within one path element, `**` across elements; a pattern that matches a
    directory matches everything under it; the last matching pattern wins."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line[1:].strip() if neg else line).lstrip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i : j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((neg, pat, re.compile(rx)))
    return rules


def _excluded(rules, path):
    parts = path.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for neg, _, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            out = not neg
    return out


def test_dockerignore_keeps_the_build_context_small():
    # the matcher below follows Docker's rules
    toy = _dockerignore_rules("*\n!keep\n**/__pycache__\n")
    assert _excluded(toy, "a.txt") and _excluded(toy, "dir/deep/file") and not _excluded(toy, "keep/x.py")
    assert _excluded(toy, "keep/sub/__pycache__/x.pyc") and _excluded(
        _dockerignore_rules("/runs/"), "runs/a/b"
    )
    assert not _excluded(_dockerignore_rules("docs/*.md"), "docs/sub/x.md")
    dockerfile = (K8S / "Dockerfile").read_text()
    # the Dockerfile is built from the repository root and copies all of the context: .dockerignore decides
    assert "docker build -f kubernetes/Dockerfile" in dockerfile and re.search(
        r"^COPY .*\s\.\s+/home/ray/\S+$", dockerfile, re.M
    )
    rules = _dockerignore_rules((ROOT / ".dockerignore").read_text())
    kept = [
        "pyproject.toml",
        "README.md",
        "progrow_ray/__init__.py",
        "progrow_ray/pipeline.py",
        "progrow_ray/core/models/gpt.py",
        "jobs/gpt2-124m.yaml",
        *(
            re.search(r"--config (\S+)", yaml.safe_load(m.read_text())["spec"]["entrypoint"]).group(1)
            for m in (K8S / "rayjob.yaml",)
        ),
    ]
    for path in kept:
        assert not _excluded(rules, path), f"{path} is needed by the image but excluded"
    dropped = [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".venv/bin/python",
        "data/tokens/shard_0.bin",
        "runs/gpt2/ray/checkpoint_0/model.pt",
        "out/smoke/report.json",
        ".git/HEAD",
        ".git/objects/ab/cd",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "progrow_ray.egg-info/PKG-INFO",
        "progrow_ray/__pycache__/x.pyc",
        "progrow_ray/core/__pycache__/gpt.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        "progrow_ray/jobs/mlflow.db",
        ".ray-local/head.pid",
        "build/lib/x.py",
        ".whl/x.whl",
        "tests/conftest.py",
    ]
    for path in dropped:
        assert _excluded(rules, path), f"{path} would be copied into the image"
    # and on this checkout (whatever it holds: a multi-GB .venv, data/, runs/): the context Docker would
    # upload
    negated = [p for neg, p, _ in rules if neg]
    size = 0
    for top, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(top, ROOT)
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [
            d
            for d in dirs
            if not _excluded(rules, rel + d) or any(p.startswith(rel + d + "/") or "*" in p for p in negated)
        ]
        size += sum(
            os.path.getsize(os.path.join(top, f))
            for f in files
            if not _excluded(rules, rel + f) and os.path.isfile(os.path.join(top, f))
        )
    assert size < 20 * 2**20, f"build context {size / 2**20:.0f} MiB"


# ---- GPUs per pod ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycluster.yaml"])
def test_clusters_offer_8_gpu_pods_for_the_large_phase_and_1_gpu_pods_for_small_work(manifest):
    doc = yaml.safe_load((K8S / manifest).read_text())
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    shapes = {n: deploy_check.ray_shape(g) for n, g in groups.items()}
    big = [n for n, s in shapes.items() if s["gpus"] == 8]
    small = [n for n, s in shapes.items() if s["gpus"] == 1]
    assert big and small, shapes
    for n in big + small:
        pod = groups[n]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        # NCCL across pods: pinned to the pod interface, warnings on; no hostNetwork needed
        assert (
            env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] == "WARN"
        )
        assert not pod.get("hostNetwork")
        shm = next(
            v
            for v in pod["volumes"]
            if v["name"] == next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
        )
        assert shm["emptyDir"]["medium"] == "Memory"
        # sized with the pod: >= 8 GiB per GPU, well under the memory limit it is charged to
        size = deploy_check.quantity(shm["emptyDir"]["sizeLimit"])
        assert 8 * 2**30 * shapes[n]["gpus"] <= size <= shapes[n]["memory"] / 4
        # every GPU of the pod gets a worker of the GPU presets (ray.cpus_per_worker CPUs each)
        cpw = max(load_run_config(p, [], cls=PipelineConfig).ray.cpus_per_worker for p in GPU_PRESETS)
        assert shapes[n]["cpus"] >= shapes[n]["gpus"] * cpw
        assert groups[n]["minReplicas"] == 0 < groups[n]["maxReplicas"]


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.stem)
def test_rayjob_cluster_fits_every_gpu_preset(tmp_path, preset):
    doc = yaml.safe_load(RAYJOB.read_text())
    doc["spec"]["entrypoint"] = f"python -m progrow_ray.pipeline --config jobs/{preset.name}"
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(doc))
    assert check_manifest(tmp_path / "rayjob.yaml") == []
    # the same, counted here: Ray Train packs one worker (cpus_per_worker CPUs, 1 GPU) per GPU; with
    # ray.standby
    # phase 1 and phase 2 hold their workers at once
    r = load_run_config(preset, [], cls=PipelineConfig).ray
    holds = 0
    for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        holds += g["maxReplicas"] * min(int(lim["nvidia.com/gpu"]), int(lim["cpu"]) // int(r.cpus_per_worker))
    assert holds >= r.large.max + r.small.max
    # phase 2 fills whole 8-GPU pods: its all-reduce leaves a pod only between pods
    assert r.large.min % 8 == 0 and r.large.max % 8 == 0


@pytest.mark.cluster
def test_local_cluster_script_starts_and_stops_exactly_its_processes(tmp_path):
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PROGROW_LOCAL_CLUSTER_DIR": str(tmp_path / "st"),
        "GCS_PORT": "6397",
        "DASH_PORT": "8297",
        "CPUS": "1",
        "HOME": str(tmp_path),
    }
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
