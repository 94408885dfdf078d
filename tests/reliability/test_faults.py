"""Fault matrix on real components (local Ray, loopback): worker deaths at three points plus a torn
checkpoint, with MLflow down, must end bit-exactly where an uninterrupted run ends; a driver killed in
the tau search and in phase 1 resumes with the same command."""

import json
import os
import signal
import subprocess
import time

import pytest

from ..orchestration.test_pipeline import ENV, ROOT, free_port, pipeline_cmd, run, run_logs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
COMMON = ("--set", "tune.enabled=false", "--set", "baseline.enabled=false", "--set", "ray.max_failures=3")


def train_losses(state: dict, phase: str) -> list:
    return [(e["step"], e["train_loss"]) for e in state["phases"][phase]["history"] if e["event"] == "train"]


@pytest.fixture(scope="module")
def clean(text_corpus, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run(pipeline_cmd(text_corpus, prepared, out, *COMMON))
    return json.loads((out / "tiny" / "report.json").read_text()), json.loads(
        (out / "tiny" / "pipeline_state.json").read_text()
    )


def test_worker_faults_and_a_torn_checkpoint_end_bit_exactly_like_a_clean_run(
    clean, text_corpus, prepared, tmp_path
):
    markers = {k: tmp_path / f"{k}.json" for k in ("phase1", "expansion", "torn")}
    faults = [
        {"phase": "phase1", "at_tokens": 3072, "rank": 0, "marker": str(markers["phase1"])},
        # tau = 6144: the expand event fires right after the expansion, before phase 2's first step
        {"phase": "phase2", "at_tokens": 6144, "rank": 1, "marker": str(markers["expansion"])},
        # fires at the next logged step (10240): tear the newest registered checkpoint (9216), die; the
        # restart must detect it and resume from the one before (8192)
        {
            "phase": "phase2",
            "at_tokens": 9216,
            "rank": 0,
            "marker": str(markers["torn"]),
            "action": "corrupt_latest",
            "delay_s": 3,
        },
    ]
    dead_mlflow = f"http://127.0.0.1:{free_port()}"  # nothing listens there: MLflow is down
    out = tmp_path / "out"
    log = run(
        pipeline_cmd(text_corpus, prepared, out, *COMMON, "--mlflow-uri", dead_mlflow),
        env={**ENV, "PROGROW_FAULT": json.dumps(faults)},
    )
    fired = {k: json.loads(m.read_text()) for k, m in markers.items()}  # every worker really died
    assert fired["torn"]["damaged"] is not None and fired["expansion"]["tokens"] == 6144
    workers = run_logs(out / "tiny")  # what the workers printed is in the run's log file, not on the console
    assert "does not match its sha256" in workers and "resumed from the older checkpoint" in workers
    assert "does not match its sha256" not in log
    assert log.count("MLflow at") == 1 and "training continues without tracking" in log
    report = json.loads((out / "tiny" / "report.json").read_text())
    state = json.loads((out / "tiny" / "pipeline_state.json").read_text())
    clean_report, clean_state = clean
    assert report["progressive"]["final_val_loss"] == clean_report["progressive"]["final_val_loss"]
    for phase in ("phase1", "phase2"):
        assert train_losses(state, phase) == train_losses(clean_state, phase)
        assert state["phases"][phase]["flops"] == clean_state["phases"][phase]["flops"]
    assert report["mlflow"]["parent_run_id"] is None  # nothing was tracked, nothing crashed


def wait_for(predicate, proc, timeout=400):
    """Polls a condition that cannot pass by (the run is held at a fault point), bounded in time; a
    failed wait kills the run's process group, so no held process outlives the test."""
    deadline = time.time() + timeout
    try:
        while not predicate():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "timed out"
            time.sleep(0.3)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def probes_checkpointed(search_dir, trials) -> bool:
    """Tune's experiment state (what Tuner.restore reads) has a checkpoint as the last result of each of
    ``trials`` (their indices in the grid: fixed 0, progressive 1, source 2)."""
    for state in search_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            return False  # being written
        last = {json.loads(t)["trial_id"][-5:]: json.loads(r).get("last_result") or {} for t, r in data}
        return all(last.get(f"{i:05d}", {}).get("checkpoint_dir_name") for i in trials)
    return False


def test_driver_killed_in_the_search_and_in_phase1_resumes(clean, text_corpus, prepared, tmp_path):
    out = tmp_path / "out"
    cmd = pipeline_cmd(
        text_corpus,
        prepared,
        out,
        "--set",
        "baseline.enabled=false",
        "--set",
        "tune.search_fraction=1.0",
        "--set",
        "tune.on_no_saving=expand",
    )
    root = out / "tiny"

    def start(faults):
        # the run blocks at the hold point (a fault of the action "hold"): the kill cannot come too late
        faults = [faults] if isinstance(faults, dict) else faults
        faults = [f if "role" in f and f["at_tokens"] == 1024 else {**f, "action": "hold"} for f in faults]
        env = {**ENV, "PROGROW_FAULT": json.dumps(faults)}
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def kill(proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # 1. during the tau search: the progressive probe is killed at 1,024 tokens (Tune restarts it from its
    #    checkpoint at 512), then holds at 2,048; the fixed probe holds at 1,536. The driver is killed once
    #    Tune's experiment state has both probes' checkpoints: they are what the restore resumes from.
    held = {r: tmp_path / f"held-{r}.json" for r in ("fixed", "progressive")}
    killed = tmp_path / "killed-progressive.json"
    proc = start(
        [
            {"phase": "tau-search", "role": "progressive", "at_tokens": 1024, "marker": str(killed)},
            {"phase": "tau-search", "role": "fixed", "at_tokens": 1536, "marker": str(held["fixed"])},
            {
                "phase": "tau-search",
                "role": "progressive",
                "at_tokens": 2048,
                "marker": str(held["progressive"]),
            },
        ]
    )
    search_dir = root / "ray" / "tiny-tau-search"
    wait_for(lambda: killed.exists() and all(m.exists() for m in held.values()), proc)
    wait_for(lambda: probes_checkpointed(search_dir, (0, 1)), proc)
    assert json.loads(held["fixed"].read_text())["tokens"] == 1536
    kill(proc)
    state = json.loads((root / "pipeline_state.json").read_text())
    assert "tau_search" not in state  # the search had not finished
    # 2. during phase 1: rank 0 holds at 3072 tokens, once a checkpoint is committed
    held = tmp_path / "held-phase1.json"
    proc = start({"phase": "phase1", "at_tokens": 3072, "marker": str(held)})
    wait_for(
        lambda: held.exists() and list((root / "ray" / "tiny-phase1").glob("checkpoint_*/manifest.json")),
        proc,
    )
    kill(proc)
    state = json.loads((root / "pipeline_state.json").read_text())
    assert "tau_search" in state and "phases" not in state
    # the search was continued (Tuner.restore), not started over: no probe restarted from zero
    search = state["tau_search"]
    assert search["resumed"]
    trials = {t["role"]: t for t in search["trials"]}
    assert trials["progressive"]["restarts"][0] == 512  # Tune's own restart after the kill
    for role in ("fixed", "progressive"):
        assert trials[role]["restarts"][-1] >= 1024, trials[role]["restarts"]  # the driver's restore
        assert all(r > 0 for r in trials[role]["restarts"])
        tokens = [p["tokens"] for p in trials[role]["curve"]]
        assert tokens == sorted(set(tokens)) and tokens[0] == 512  # one curve, no point twice
    # 3. the same command finishes: search skipped, phase 1 resumed from its checkpoint
    log = run(cmd)
    assert "τ search" not in log  # the finished search is not run again
    report = json.loads((root / "report.json").read_text())
    assert [p["name"] for p in report["phases"]] == ["phase1", "phase2"]
    assert report["phases"][0]["tokens"] + report["phases"][1]["tokens"] == 12288
    assert {"tau_search", "progressive", "overheads", "mlflow"} <= set(report)
    state = json.loads((root / "pipeline_state.json").read_text())
    resumed = [e for e in state["phases"]["phase1"]["history"] if e["event"] == "train"]
    steps = [e["step"] for e in resumed]
    assert steps == sorted(set(steps))  # no step logged twice: the resume continued, it did not restart
    assert steps[-1] == 12  # phase 1 ran to tau = 6144 tokens (12 steps of 512)
