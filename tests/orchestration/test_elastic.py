"""Elastic phases on a multi-node Ray cluster started on this machine (a 0-CPU head and three 1-CPU
nodes, gloo, the tiny preset): nodes lost, added back and drained mid-phase; a cluster below a phase's
minimum; room for one phase only; metrics in the MLflow server while phase 1 runs. Every change to the
cluster happens while a worker stands still at a fault point (``engine/faults.py``: "pause"), so
nothing races the clock."""

import json
import os
import subprocess
import time

import pytest

from progrow_ray.engine import Trainer
from progrow_ray.engine.config import load_run_config
from progrow_ray.orchestration.config import PipelineConfig

from .test_pipeline import ENV, ROOT, TINY, pipeline_cmd, run_logs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ELASTIC = (
    "--set", "tune.enabled=false", "--set", "baseline.enabled=false",
    "--set", "ray.max_failures=6", "--set", "ray.worker_start_timeout_s=20",
    "--set", "ray.resize_check_s=3", "--set", "train.micro_batch=2",
    # each matrix's Newton–Schulz whole on one rank: the one-process arithmetic at any world size, so
    # losses compare at 1e-5 (the row-split one sums its Gram matrix in another order)
    "--set", "optimizer.ns_split=false",
)  # fmt: skip
AUTH = {"RAY_AUTH_MODE": "disabled"}  # the test cluster and the pipelines that join it (cluster/local.sh's)
WAIT_S = 240  # for a fault point to be reached (worker groups start in seconds to tens of seconds)


@pytest.fixture(scope="module")
def cluster():
    """Three 1-CPU nodes; the head takes no workers, so each node hosts one worker of a 3-worker phase.
    Without token authentication, as the pipeline subprocesses connect (``AUTH``): an earlier local
    ``ray.init`` in this process switched it to token mode (Ray 2.60 sets RAY_AUTH_MODE=token)."""
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ.update(AUTH)
    Config.initialize("")  # this process (the test's GCS calls) follows the mode too
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(3):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        Config.initialize("")


def worker_nodes(cluster):
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


def wait_for(path, proc, what: str):
    deadline = time.time() + WAIT_S
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the pipeline exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return json.loads(path.read_text())


def wait_registered(out, fit: str, tokens: int, proc) -> None:
    """Until Ray has registered the fit's checkpoint at ``tokens`` (its snapshot file says so): a restart
    resumes from the newest registered checkpoint, so the test changes the cluster only after it."""
    snapshot = out / "tiny" / "ray" / f"tiny-{fit}" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + WAIT_S
    while True:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = None
        if latest == tokens:
            return
        assert proc.poll() is None and time.time() < deadline, (
            f"checkpoint {tokens} not registered ({latest})"
        )
        time.sleep(0.2)


def pause(at_tokens: int, release, marker, phase: str = "fixed") -> dict:
    """Rank 0 stands still at ``at_tokens`` until ``release`` (a file, or "preemption") says go."""
    return {
        "phase": phase,
        "at_tokens": at_tokens,
        "action": "pause",
        "release": str(release),
        "marker": str(marker),
    }


def start(cmd, faults):
    env = {**ENV, **AUTH, "PROGROW_FAULT": json.dumps(faults)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc, timeout=WAIT_S * 2):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def reference_losses(prepared, tmp_path, *sets) -> dict:
    """The same run in one process, uninterrupted: step -> train loss."""
    overrides = [f"data.uri={prepared}", f"out={tmp_path}/ref", "tune.enabled=false", *sets]
    cfg = load_run_config(TINY, overrides, cls=PipelineConfig)
    events = []
    Trainer(cfg.run_config(), on_metrics=events.append, log=lambda _: None).run()
    return {e["step"]: e["train_loss"] for e in events if e["event"] == "train"}


def phase_losses(out, phase) -> dict:
    state = json.loads((out / "tiny" / "pipeline_state.json").read_text())
    return {e["step"]: e["train_loss"] for e in state["phases"][phase]["history"] if e["event"] == "train"}


def test_a_phase_loses_a_node_gets_it_back_and_is_drained_with_the_same_losses(
    cluster, text_corpus, prepared, tmp_path
):
    """[1, 3] workers: a node removed (no replacement) -> 2 workers; a node added -> 3 after the next resize
    check; a node drained (a preemption) -> a checkpoint before it goes, then 2 workers. The per-step
    losses equal one uninterrupted process's, and the report lists the three restarts."""
    sets = ("--set", "growth.enabled=false", "--set", "ray.workers_large=[1,3]")
    sets += ("--set", "train.checkpoint_every_tokens=2048")
    mark = {k: tmp_path / f"{k}.json" for k in ("lost", "added", "drained", "before_gone")}
    go = tmp_path / "go"
    faults = [  # rank 0 stands still there; step = tokens / 512, logged every 2 steps
        pause(3072, go, mark["lost"]),
        pause(7168, go, mark["added"]),
        pause(9216, "preemption", mark["drained"]),
        pause(10240, go, mark["before_gone"]),
    ]
    out = tmp_path / "out"
    cmd = pipeline_cmd(text_corpus, prepared, out, *ELASTIC, *sets, "--set", f"ray.address={cluster.address}")
    proc = start(cmd, faults)
    try:
        wait_for(mark["lost"], proc, "the first pause")
        wait_registered(out, "fixed", 2048, proc)
        changed = [time.time()]
        cluster.remove_node(worker_nodes(cluster)[-1], allow_graceful=False)  # lost, nobody replaces it
        wait_for(mark["added"], proc, "training on 2 workers")
        wait_registered(out, "fixed", 6144, proc)
        changed.append(time.time())
        cluster.add_node(num_cpus=1)
        wait_for(mark["drained"], proc, "training on 3 workers again")
        drained = worker_nodes(cluster)[0]
        drain(cluster, drained.node_id, deadline_s=600)  # the pause ends when the workers are told
        wait_for(mark["before_gone"], proc, "the steps after the drain notice")
        wait_registered(out, "fixed", 9216, proc)  # the checkpoint the notice asked for
        changed.append(time.time())
        cluster.remove_node(drained, allow_graceful=False)  # the drained node goes
        code, log = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log[-4000:]
    report = json.loads((out / "tiny" / "report.json").read_text())
    events = report["elastic_events"]
    assert [(e["from_workers"], e["to_workers"], e["cause"]) for e in events] == [
        (3, 2, "capacity lost"),
        (2, 3, "capacity added"),
        (3, 2, "preemption"),
    ], events
    # each restart resumes the newest checkpoint: every 2048 tokens, and at 9216 the one the drain notice
    # asked for (the cadence has none there): nothing trained before the notice is lost
    assert [e["tokens"] for e in events] == [2048, 6144, 9216], events
    assert [e["tokens_recomputed"] for e in events] == [1024, 1024, 1024], events
    assert report["phases"][0]["workers"] == 2
    assert "| fixed | 9,216 | 3 -> 2 | preemption | 1,024 |" in (out / "tiny" / "report.md").read_text()
    ref = reference_losses(
        prepared,
        tmp_path,
        "growth.enabled=false",
        "train.micro_batch=2",
        "train.checkpoint_every_tokens=2048",
    )
    got = phase_losses(out, "fixed")
    assert sorted(got) == sorted(ref) and len(ref) == 12
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    for e, at in zip(events, changed, strict=True):  # what the README quotes
        print(
            f"\n{e['cause']}: {e['from_workers']} -> {e['to_workers']} workers, first step at the new size "
            f"{e['time'] + e['first_step_s'] - at:.1f} s after the cluster changed, "
            f"{e['tokens_recomputed']:,} tokens recomputed"
        )


def drain(cluster, node_id: str, deadline_s: float) -> None:
    """A preemption notice through Ray's drain API (what a spot reclaim sends)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "test: spot reclaim",
        int(time.time() * 1000 + deadline_s * 1000),
    )
    assert accepted, why


def test_a_phase_below_its_minimum_stops_with_exit_2_and_resumes_when_capacity_returns(
    cluster, text_corpus, prepared, tmp_path
):
    """A fixed-size 3-worker phase loses a node nobody replaces: Ray alone would retry forever; the pipeline
    stops after ray.capacity_timeout_s with one line and exit 2, and the same command, once a node is back,
    resumes from the last checkpoint and ends with the uninterrupted losses."""
    while len(worker_nodes(cluster)) < 3:
        cluster.add_node(num_cpus=1)
    sets = (
        "--set",
        "growth.enabled=false",
        "--set",
        "ray.workers_large=3",
        "--set",
        "ray.capacity_timeout_s=8",
    )
    marker, go = tmp_path / "paused.json", tmp_path / "go"
    faults = [
        {"phase": "fixed", "at_tokens": 6144, "action": "pause", "release": str(go), "marker": str(marker)}
    ]
    out = tmp_path / "out"
    cmd = pipeline_cmd(text_corpus, prepared, out, *ELASTIC, *sets, "--set", f"ray.address={cluster.address}")
    proc = start(cmd, faults)
    try:
        wait_for(marker, proc, "the pause")
        wait_registered(out, "fixed", 5120, proc)
        lost_at = time.time()
        cluster.remove_node(worker_nodes(cluster)[-1], allow_graceful=False)
        code, log = finish(proc, timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_after = time.time() - lost_at
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2, log[-4000:]
    assert errors == [
        "error: fixed needs at least 3 worker(s) of 1 CPU; the cluster has held only 2 for "
        "ray.capacity_timeout_s=8 s, so the fit was stopped. Add nodes and re-run the same command: it "
        "resumes from the last checkpoint"
    ], log[-4000:]
    state = json.loads((out / "tiny" / "pipeline_state.json").read_text())
    assert "fixed" not in state.get("phases", {}) and state["config"]["name"] == "tiny"  # kept, unfinished
    cluster.add_node(num_cpus=1)
    proc = start(cmd, faults)  # the fault already fired (its marker exists): no pause this time
    code, log = finish(proc)
    assert code == 0, log[-4000:]
    assert "fixed: resumed (restart) at 5,120 tokens on 3 worker(s)" in run_logs(out / "tiny")
    ref = reference_losses(prepared, tmp_path, "growth.enabled=false", "train.micro_batch=2")
    got = phase_losses(out, "fixed")
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    print(f"\nnode lost -> exit 2 after {stopped_after:.1f} s (ray.capacity_timeout_s=8)")


def test_room_for_one_phase_pre_warms_instead_of_standby_and_mlflow_has_phase1_while_it_runs(
    cluster, text_corpus, prepared, tmp_path, mlflow_server
):
    """Phase 1 on 1 worker, phase 2 on 3, three CPUs: standby would hold 4 workers (a deadlock before), so
    phase 2 is pre-warmed and the run completes. While phase 1 stands still, the MLflow server already
    holds its run, params and metrics."""
    from mlflow.tracking import MlflowClient

    while len(worker_nodes(cluster)) < 3:
        cluster.add_node(num_cpus=1)
    sets = ("--set", "growth.tau_tokens=6144", "--set", "ray.workers_large=3", "--set", "ray.standby=true")
    marker, go = tmp_path / "paused.json", tmp_path / "go"
    faults = [
        {"phase": "phase1", "at_tokens": 4096, "action": "pause", "release": str(go), "marker": str(marker)}
    ]
    out = tmp_path / "out"
    cmd = pipeline_cmd(text_corpus, prepared, out, *ELASTIC, *sets, "--set", f"ray.address={cluster.address}")
    proc = start(cmd + ["--mlflow-uri", mlflow_server], faults)
    try:
        wait_for(marker, proc, "phase 1's pause")
        client = MlflowClient(mlflow_server)
        deadline = time.time() + 60
        while True:  # the driver streams once a second
            exp = client.get_experiment_by_name("progrow_ray")
            live = client.search_runs([exp.experiment_id], "tags.`progrow.phase` = 'phase1'") if exp else []
            losses = client.get_metric_history(live[0].info.run_id, "train_loss") if live else []
            if losses and max(m.step for m in losses) >= 8:
                break
            assert time.time() < deadline, "phase 1's metrics did not reach MLflow while it ran"
            time.sleep(0.5)
        assert live[0].info.status == "RUNNING" and live[0].data.params["train.batch_tokens"] == "512"
        assert {m.step for m in losses} == {2, 4, 6, 8}
        go.write_text("go")
        code, log = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log[-4000:]
    assert "standby off: the cluster cannot hold phase 1's 1 and phase 2's 3 worker(s) at once" in log
    report = json.loads((out / "tiny" / "report.json").read_text())
    assert [(p["name"], p["workers"]) for p in report["phases"]] == [("phase1", 1), ("phase2", 3)]
    run = client.get_run(live[0].info.run_id)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert run.info.status == "FINISHED" and sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
