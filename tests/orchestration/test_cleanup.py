"""A submitted job whose Ray Train controller dies leaves no placement group behind: Ray Train's
placement-group cleaner must reach *this* cluster's state API. Without `cluster/local.sh` naming it
(RAY_API_SERVER_ADDRESS), the cleaner guesses from `$RAY_TMPDIR/ray/ray_current_cluster`, which here is
stale on purpose (as another cluster that ran on the machine leaves it): it then times out and the
group stays CREATED forever."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_pipeline import ENV, ROOT, TINY, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def until(predicate, timeout: float, what: str, poll: float = 0.5):
    """Polls a condition that the test has made certain to come (bounded, never a bare sleep)."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def test_killed_controller_of_a_submitted_job_leaves_no_placement_group(text_corpus, prepared, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    stale = tmp_path / "rt" / "ray"
    stale.mkdir(parents=True)
    (stale / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    dash, gcs = free_port(), free_port()
    env = {
        **ENV,
        "RAY_TMPDIR": str(tmp_path / "rt"),
        "PROGROW_LOCAL_CLUSTER_DIR": str(tmp_path / "cl"),
        "GCS_PORT": str(gcs),
        "DASH_PORT": str(dash),
        "AGENT_PORT": str(free_port()),
        "CPUS": "2",
        "RAY": str(Path(sys.executable).parent / "ray"),
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}",
    }
    script = str(ROOT / "cluster" / "local.sh")
    start = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    url = f"http://127.0.0.1:{dash}"
    try:
        held = tmp_path / "held.json"  # rank 0 holds inside the train function: the controller is running it
        job_env = {
            "PROGROW_FAULT": json.dumps(
                {"phase": "fixed", "at_tokens": 1024, "action": "hold", "marker": str(held)}
            ),
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        }
        client = JobSubmissionClient(url)
        job = client.submit_job(
            entrypoint=" ".join(
                [
                    sys.executable,
                    "-m",
                    "progrow_ray.pipeline",
                    "--config",
                    str(TINY),
                    "--out",
                    str(tmp_path / "out"),
                    "--set",
                    f"data.source={text_corpus}",
                    "--set",
                    f"data.uri={prepared}",
                    "--set",
                    "tune.enabled=false",
                    "--set",
                    "growth.enabled=false",
                    "--set",
                    "baseline.enabled=false",
                    "--set",
                    "ray.workers_large=1",
                    "--set",
                    "ray.local_cpus=2",
                ]
            ),
            runtime_env={"env_vars": job_env},
        )
        until(lambda: held.exists() or client.get_job_status(job).is_terminal(), 300, "the hold point")
        assert held.exists(), client.get_job_logs(job)[-3000:]

        def live_groups():
            return [
                g
                for g in list_placement_groups(address=url, limit=1000, raise_on_missing_output=False)
                if g.state in ("PENDING", "CREATED", "RESCHEDULING")
            ]

        assert live_groups()  # the fit's group exists while it trains
        controllers = list_actors(
            address=url,
            filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        assert len(controllers) == 1, controllers
        os.kill(controllers[0].pid, signal.SIGKILL)  # the controller crashes (same machine: a real kill)
        until(lambda: not live_groups(), 60, "the cleaner to remove the dead controller's placement group")
        until(lambda: client.get_job_status(job).is_terminal(), 120, "the job to end")
        assert client.get_job_status(job) == JobStatus.FAILED
        logs = client.get_job_logs(job)
        assert "error:" in logs and "Traceback" not in logs  # one line for the user, details in the run log
    finally:
        stop = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
