"""The pipeline end to end on real components over loopback: a local Ray cluster, S3 through a moto
server, an MLflow tracking server, a worker killed in phase 2, a driver killed and re-run, and
`ray job submit` against a `ray start --head` cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ..s3 import make_bucket, moto_s3

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny.yaml")
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until ``url`` answers; fails if ``proc`` (the server) exits or the time runs out."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            assert time.time() < deadline and proc.poll() is None, f"{url} did not come up"
            time.sleep(0.5)


def pipeline_cmd(corpus, data_uri, out, *extra):
    return [
        sys.executable,
        "-m",
        "progrow_ray.pipeline",
        "--config",
        str(TINY),
        "--out",
        str(out),
        "--set",
        f"data.source={corpus}",
        "--set",
        f"data.uri={data_uri}",
        *extra,
    ]


def run(cmd, env=None, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout + p.stderr


def run_logs(run_dir: Path) -> str:
    """The run's log files (Ray's, Tune's and the workers' output), oldest first."""
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("pipeline-*.log")))


def upload_parquet_corpus(fs, text_corpus, prefix: str) -> str:
    """The text corpus as a web-text dump: parquet files with a ``text`` column (one row per paragraph)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = [
        p for f in sorted(Path(text_corpus).iterdir()) for p in f.read_text().split("\n\n") if p.strip()
    ]
    for i in range(3):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(i, len(paragraphs), 3)), "text": paragraphs[i::3]}), buf)
        fs.pipe(f"{prefix}/part-{i:05d}.parquet", buf.getvalue())
    return f"s3://{prefix}/*.parquet"


def check_report(report: dict, total: int = 12288) -> None:
    keys = {"config", "tau_search", "phases", "progressive", "baseline", "savings", "overheads", "mlflow"}
    assert keys <= set(report)
    assert {"t_mix_tokens", "tau_tokens", "verdict", "search_flops", "trials"} <= set(report["tau_search"])
    names = [p["name"] for p in report["phases"]]
    if report["tau_search"]["expand"]:
        p1, p2 = report["phases"]
        assert names == ["phase1", "phase2"] and p1["depth"] == 0 and p2["depth"] == 2
        assert p2["workers"] > p1["workers"] and p2["global_batch_tokens"] > p1["global_batch_tokens"]
        assert p1["tokens"] + p2["tokens"] == total
        assert report["overheads"]["phase_switch_s"] > 0
        breakdown = report["overheads"]["phase_switch_breakdown"]
        assert set(breakdown) in (
            {"handoff_s", "restore_and_expand_s", "data_s"},
            {"between_fits_s", "workers_start_s", "restore_and_expand_s", "data_s"},
        )
        if "handoff_s" in breakdown:  # standby staged the shards while it waited: no data work at τ
            assert breakdown["data_s"] < 0.5, breakdown
    else:
        assert names == ["fixed"]
    for p in report["phases"]:
        assert {
            "depth",
            "workers",
            "global_batch_tokens",
            "tokens",
            "flops",
            "final_train_loss",
            "checkpoint_uri",
        } <= set(p)
    assert report["progressive"]["final_val_loss"] > 0 and report["baseline"]["final_val_loss"] > 0
    assert report["savings"]["flops_fraction"] > 0
    # the paper's eq. 1.1 count: a zero-layer source has no non-embedding weights, so only T - tau costs
    tau = report["tau_search"]["tau_tokens"] if report["tau_search"]["expand"] else 0
    assert report["savings"]["flops_fraction_paper"] == pytest.approx((total - tau) / total)


def test_pipeline_on_s3_with_mlflow_server_survives_a_phase2_worker_kill(
    text_corpus, tmp_path, mlflow_server
):
    marker = tmp_path / "killed.json"
    fault = {"phase": "phase2", "at_tokens": 10240, "rank": 1, "marker": str(marker)}
    with moto_s3():
        fs = make_bucket("runs")
        env = {
            **ENV,
            **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")},
            "PROGROW_FAULT": json.dumps(fault),
        }
        # the README's recipe: a web-text dump as parquet files with a `text` column in S3, tokenised on
        # Ray Data into S3, then the pipeline on it (its data stage finds the shards up to date; the workers
        # read them through their node cache)
        web = upload_parquet_corpus(fs, text_corpus, "runs/web")
        prepare_cmd = [
            sys.executable,
            "-m",
            "progrow_ray.data",
            "prepare",
            "--engine",
            "ray",
            "--source",
            web,
        ]
        prepare_cmd += ["--out", "s3://runs/tokens", "--val-fraction", "0.15", "--no-progress"]
        # its own local cluster ("local"), never one another process started on this machine
        prep_env = {k: v for k, v in env.items() if k != "PROGROW_FAULT"} | {"RAY_ADDRESS": "local"}
        log = run(prepare_cmd, env=prep_env)
        assert "s3://runs/tokens:" in log and fs.exists("runs/tokens/meta.json")
        out = run(
            pipeline_cmd(
                web,
                "s3://runs/tokens",
                "s3://runs/exp",
                "--set",
                f"data.cache_dir={tmp_path / 'node-cache'}",
                "--mlflow-uri",
                mlflow_server,
                "--set",
                "tune.search_fraction=1.0",
                "--set",
                "tune.safety=2.0",
                "--set",
                "tune.on_no_saving=expand",
                "--set",
                "train.parallel=fsdp",  # FSDP2 in Ray Train workers, restarted from a checkpoint
            ),
            env=env,
        )
        assert "MLflow runs: " + mlflow_server in out
        assert "up to date" in out  # prepared on Ray Data above: the pipeline's data stage had nothing to do
        assert list((tmp_path / "node-cache").glob("*/.verified"))  # one verified copy on this node
        report = json.loads(fs.cat("runs/exp/tiny/report.json"))
        check_report(report)
        assert report["tau_search"]["expand"], report["tau_search"]["verdict"]
        assert json.loads(marker.read_text())["phase"] == "phase2"  # the worker really died
        p2 = report["phases"][1]
        assert p2["checkpoint_uri"].startswith("s3://runs/exp/tiny/ray/tiny-phase2/")
        assert fs.exists(p2["checkpoint_uri"][len("s3://") :] + "/manifest.json")
        written = json.loads(fs.cat(p2["checkpoint_uri"][len("s3://") :] + "/state.json"))
        assert (written["parallel"], written["world_size"]) == ("fsdp", 2)
        assert fs.exists("runs/exp/tiny/loss_vs_flops.png")
        state = json.loads(fs.cat("runs/exp/tiny/pipeline_state.json"))
        steps = [e["step"] for e in state["phases"]["phase2"]["history"] if e["event"] == "train"]
        assert steps == sorted(set(steps)) and state["phases"]["phase2"]["tokens_end"] == 12288
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    # MLflow: parent + children, metrics vs step/tokens/flops, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("progrow_ray")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["tiny"]
    assert parent.info.run_id == report["mlflow"]["parent_run_id"]
    children = {n for n, r in by_name.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {
        "search-fixed",
        "search-progressive",
        "search-source",
        "phase1",
        "phase2",
        "baseline",
        "progressive",
    } <= children
    assert by_name["phase2"].data.tags["progrow.workers"] == "2"
    for name in ("search-fixed", "search-progressive", "phase1", "phase2"):  # streamed while they ran
        steps = [m.step for m in client.get_metric_history(by_name[name].info.run_id, "train_loss")]
        assert steps and len(steps) == len(set(steps)), (name, steps)  # a restarted step is logged once
    history = client.get_metric_history(by_name["phase2"].info.run_id, "val_loss")
    assert history and all(m.step > 0 for m in history)
    assert client.get_metric_history(by_name["phase2"].info.run_id, "flops")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.md", "config.yaml", "loss_vs_tokens.png", "loss_vs_flops.png"} <= artifacts
    params = parent.data.params
    assert params["train.total_tokens"] == "12288" and secret not in json.dumps(params)
    # the comparison is one click: a model-training experiment with saved views grouping the arms
    arms = {r.data.tags["progrow.arm"]: r for r in runs if "progrow.arm" in r.data.tags}
    assert {"progressive", "baseline", "search-fixed"} <= set(arms) and "progrow.arm" not in by_name[
        "phase1"
    ].data.tags
    val = client.get_metric_history(
        arms["progressive"].info.run_id, "val_loss"
    )  # both phases' curve in one run
    flops = client.get_metric_history(arms["progressive"].info.run_id, "flops")
    # the UI pairs x and y by index: the x metric of val_loss is logged exactly at its points
    assert [m.step for m in val] == [m.step for m in flops] and len(val) >= 3
    assert [m.value for m in flops] == sorted(m.value for m in flops)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(json.loads(exp.tags["mlflow.sharedViewState.loss-vs-flops"])["state"])
    assert view["globalLineChartConfig"]["selectedXAxisMetricKey"] == "flops"
    url = (
        f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=loss-vs-flops"
    )
    assert f"compare progressive vs baseline on FLOPs: {url}" in out
    images = [a.path.split("/")[1] for a in client.list_artifacts(parent.info.run_id, "images")]
    for key in ("loss_vs_flops", "loss_vs_tokens"):  # log_image: shown under the parent's "Model metrics"
        assert any(name.startswith(key) for name in images), images
    text = render_page(
        url, ("progressive vs baseline: val loss vs FLOPs", "val_loss", "baseline"), tmp_path / "compare.png"
    )
    assert "Group:" in text and "progressive" in text and "train_loss" not in text
    # the report's plots: every line runs forward in x, τ marked on both (the data behind loss_vs_*.png)
    from progrow_ray.orchestration.records import PhaseResult
    from progrow_ray.report import plot_lines, plot_runs

    phases = [
        PhaseResult.from_json(state["phases"]["phase1"]),
        PhaseResult.from_json(state["phases"]["phase2"]),
    ]
    for x in ("tokens", "flops"):
        data = plot_lines(plot_runs(phases, None), x)
        assert all(all(b >= a for a, b in zip(line.x, line.x[1:])) for line in data.lines)
        assert len(data.markers) == 1 and sum(len(line.x) for line in data.lines) >= 8


def render_page(url: str, wait_for: tuple[str, ...], shot: Path) -> str:
    """The page as headless Chromium renders it (text of the DOM); a screenshot beside it."""
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the MLflow UI checks (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
        "--window-size=1600,1000",
    ]
    text = ""
    for budget in (20_000, 40_000, 80_000):  # a loaded machine may need more virtual time to render
        dom = subprocess.run(
            [*flags, f"--virtual-time-budget={budget}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        ).stdout
        text = re.sub(r"<[^>]+>", " ", dom)
        if all(w in text for w in wait_for):
            break
    subprocess.run(
        [*flags, "--virtual-time-budget=20000", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=180,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return re.sub(r"\s+", " ", text)


def test_rerun_resumes_a_killed_driver_and_skips_a_finished_run(text_corpus, prepared, tmp_path):
    out = tmp_path / "out"
    cmd = pipeline_cmd(
        text_corpus,
        prepared,
        out,
        "--set",
        "tune.enabled=false",
        "--set",
        "baseline.enabled=false",
        "--set",
        "train.total_tokens=16384",
    )
    held = tmp_path / "held.json"  # phase 2's rank 0 blocks there until the driver is killed: no race
    hold = {"phase": "phase2", "at_tokens": 12288, "rank": 0, "action": "hold", "marker": str(held)}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**ENV, "PROGROW_FAULT": json.dumps(hold)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    state_path = out / "tiny" / "pipeline_state.json"
    deadline = time.time() + 400
    # kill the driver once phase 2 holds and has committed a checkpoint
    try:
        while not (
            held.exists() and list((out / "tiny" / "ray" / "tiny-phase2").glob("checkpoint_*/manifest.json"))
        ):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "timed out"
            time.sleep(0.5)
    finally:  # the kill under test, and no held run left behind if the wait failed
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads(state_path.read_text())
    assert "phase1" in state["phases"] and "phase2" not in state["phases"]
    log = run(cmd)
    assert "phase1: done earlier, skipped" in log
    report = json.loads((out / "tiny" / "report.json").read_text())
    p2 = json.loads(state_path.read_text())["phases"]["phase2"]
    assert p2["tokens_end"] == 16384 and report["phases"][1]["name"] == "phase2"
    assert report["baseline"] is None
    again = run(cmd)
    assert "already finished" in again


def test_a_measured_t_mix_is_reused_by_a_matching_pipeline_and_not_for_another_lr(
    text_corpus, prepared, tmp_path
):
    """The registry: a search's t_mix is recorded with its fingerprint (run storage and MLflow); a second
    pipeline with the same fingerprint skips the search and uses it, then writes its measured loss gap
    back; another learning rate does not match (tune.reuse=only refuses it at start)."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    mixes = (
        "--set",
        "tune.min_depth_advantage=0",
        "--set",
        "tune.rel_tol=0.05",
        "--set",
        "tune.on_no_saving=expand",
    )
    run(
        pipeline_cmd(
            text_corpus, prepared, out, *mixes, "--set", "name=first", "--set", "baseline.enabled=false"
        )
    )
    first = json.loads((out / "first" / "report.json").read_text())["tau_search"]
    reg = first["registry"]
    assert first["t_mix_tokens"] is not None and reg["reused"] is False and first["search_flops"] > 0
    registry = out / "tmix-registry"
    listed = run([sys.executable, "-m", "progrow_ray.tmix", "list", "--registry", str(registry)])
    assert reg["key"] in listed and f"{first['t_mix_tokens']:,}" in listed
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (search_run,) = client.search_runs(
        [client.get_experiment_by_name("progrow_ray").experiment_id],
        f"tags.`progrow.tmix.key` = '{reg['key']}'",
    )
    assert search_run.data.metrics["t_mix_tokens"] == first["t_mix_tokens"]
    assert json.loads(search_run.data.tags["progrow.tmix.fingerprint"])["optimizer"]["lr"] == 0.01

    log = run(
        pipeline_cmd(text_corpus, prepared, out, *mixes, "--set", "name=second", "--set", "tune.reuse=only")
    )
    assert "from the registry" in log and "τ search (Ray Tune)" not in log
    second = json.loads((out / "second" / "report.json").read_text())
    s = second["tau_search"]
    assert s["registry"]["reused"] and s["registry"]["key"] == reg["key"] and s["search_flops"] == 0
    assert s["t_mix_tokens"] == first["t_mix_tokens"] and s["tau_tokens"] == first["tau_tokens"]
    entry = json.loads((registry / f"{reg['key']}.json").read_text())
    (outcome,) = entry["measurements"][-1]["outcomes"]  # the baseline's measured gap, written back
    assert outcome["run"] == "second" and outcome["measured_gap_rel"] == pytest.approx(
        second["savings"]["loss_gap_rel"]
    )

    other = subprocess.run(
        pipeline_cmd(
            text_corpus,
            prepared,
            out,
            *mixes,
            "--set",
            "name=third",
            "--set",
            "tune.reuse=only",
            "--set",
            "optimizer.lr=0.02",
        ),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        other.returncode == 2
        and "tune.reuse=only" in other.stderr
        and "no t_mix for this run" in other.stderr
    )
    assert not (out / "third").exists()  # refused before anything of the run was written
    forgot = run(
        [sys.executable, "-m", "progrow_ray.tmix", "forget", reg["key"], "--registry", str(registry)]
    )
    assert "forgot 1 measurement" in forgot and not (registry / f"{reg['key']}.json").exists()


def test_ray_job_submit_against_a_started_head(text_corpus, prepared, tmp_path):
    gcs, dash = free_port(), free_port()
    env = {**ENV, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # not the default agent port 52365: another cluster on the machine may hold it
            # ("No available agent to submit job")
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tempfile.mkdtemp(prefix='rh', dir='/tmp')}",
        ],  # short: socket paths
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_http(f"{address}/api/version", head, 120)
        out = tmp_path / "job"
        # load: 4 concurrent Tune probes (fixed, 0-layer, 1-layer, source) on the 4-CPU head of a 2-core
        # machine,
        # then phase 1 beside phase 2's standby workers
        cmd = [
            ray_bin,
            "job",
            "submit",
            "--address",
            address,
            "--",
            *pipeline_cmd(
                text_corpus,
                prepared,
                out,
                "--set",
                "tune.one_layer_probe=true",
                "--set",
                "tune.on_no_saving=expand",
                "--set",
                "tune.search_fraction=1.0",
                "--set",  # four probes fit the budget with an earlier expansion
                "schedule.warmup_frac=0.02",
                "--set",
                "baseline.enabled=false",
            ),
        ]
        log = run(cmd, env=env, timeout=600)
        assert "succeeded" in log.lower()
        assert "connected to Ray at" in log
        check_report_path = out / "tiny" / "report.json"
        report = json.loads(check_report_path.read_text())
        assert [p["name"] for p in report["phases"]] == ["phase1", "phase2"]
        assert sorted(t["role"] for t in report["tau_search"]["trials"]) == [
            "fixed",
            "progressive",
            "progressive-1",
            "source",
        ]
        # nothing leaked on the long-lived cluster: every placement group the job made is gone
        from ray.util.state import list_placement_groups

        deadline = time.time() + 60
        while True:
            groups = list_placement_groups(address=address, limit=1000, raise_on_missing_output=False)
            live = [g for g in groups if g.state in ("PENDING", "CREATED", "RESCHEDULING")]
            if not live or time.time() > deadline:
                break
            time.sleep(2)
        assert groups and not live, live
    finally:  # stop exactly the processes this test started (never `ray stop`)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)


def test_resnet_trains_through_the_pipeline_on_generated_images(tmp_path):
    """The ResNet testbed takes the language models' path: τ search, phase 1 on one worker, growth per stage,
    phase 2 and the baseline on two, FLOPs counted per image."""
    from progrow_ray.engine.config import load_run_config
    from progrow_ray.orchestration.config import PipelineConfig

    config = TINY.with_name("tiny-resnet.yaml")
    out = run([sys.executable, "-m", "progrow_ray.pipeline", "--config", str(config), "--out", str(tmp_path)])
    assert "phase2       depth [2, 2, 1, 1], 2 worker(s)" in out, out[-3000:]
    report = json.loads((tmp_path / "tiny-resnet" / "report.json").read_text())
    p1, p2 = report["phases"]
    assert (p1["depth"], p1["workers"], p1["tokens"]) == ([1, 1, 1, 1], 1, 512)
    assert (p2["depth"], p2["workers"], p2["global_batch_tokens"], p2["tokens"]) == ([2, 2, 1, 1], 2, 64, 512)
    cfg = load_run_config(config, [], cls=PipelineConfig)
    small, large = cfg.flops_per_unit()  # per 16x16 image
    assert p1["flops"] == pytest.approx(small * 512) and p2["flops"] == pytest.approx(large * 512)
    assert report["baseline"]["flops"] == pytest.approx(large * 1024)
    assert 0 < report["progressive"]["final_val_loss"] < 2.31  # below chance (ln 10) on 10 classes
