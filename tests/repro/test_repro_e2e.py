"""A real experiment end to end: Ray Tune grid on a local cluster, table + plot + results.json, MLflow
runs — then the MLflow UI served on loopback and rendered by headless Chromium, which must list them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "progrow_ray.repro",
            "batch-after-expansion",
            "--tokens",
            "4096",
            "--data-uri",
            prepared,
            "--out",
            str(out),
            "--local-cpus",
            "2",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_experiment_writes_table_plot_and_verdict_from_its_numbers(finished):
    out, stdout = finished
    d = out / "batch-after-expansion"
    res = json.loads((d / "results.json").read_text())
    trials = {t["id"]: t for t in res["trials"]}
    assert set(trials) == {"fixed", "batch-1x", "batch-4x"}
    one, four = trials["batch-1x"], trials["batch-4x"]
    assert one["expansions"] == [2048] and four["expansions"] == [2048]
    # same tokens; after tau the 4x batch takes one step where 1x takes four (logged every 2 steps and at
    # the end)
    assert one["tokens"] == four["tokens"] == 4096
    assert [c[0] for c in one["curve"]] == [1024, 2048, 3072, 4096] and [c[0] for c in four["curve"]] == [
        1024,
        2048,
        4096,
    ]
    # the paper's eq. 1.1 count: the zero-layer source has no non-embedding weights, so tau = T/2 costs half
    assert one["flops_paper"] == pytest.approx(trials["fixed"]["flops_paper"] / 2)
    assert one["flops"] > one["flops_paper"]  # the full count also charges the head and attention
    diff = (four["val_loss"] - one["val_loss"]) / one["val_loss"]
    assert res["holds"] == (abs(diff) <= 0.01)
    assert f"{diff:+.2%}" in res["verdict"]
    md = (d / "batch-after-expansion.md").read_text()
    assert (
        res["verdict"] in md
        and "![" in md
        and "| batch-4x |" in md
        and "FLOPs vs fixed (paper eq. 1.1)" in md
    )
    png = (d / "batch-after-expansion-1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "summary:" in stdout and res["verdict"] in stdout


def test_mlflow_ui_lists_the_experiment_runs(finished, tmp_path):
    out, _ = finished
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium for the MLflow UI test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{out}/mlflow.db",
            "--default-artifact-root",
            str(tmp_path / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not come up"
                time.sleep(0.5)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("progrow_ray-repro")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 4  # parent + 3 trials
        page = f"{uri}/#/experiments/{exp.experiment_id}/runs"
        flags = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
            "--virtual-time-budget=20000",
        ]
        shot = tmp_path / "runs.png"
        subprocess.run(flags + [f"--screenshot={shot}", page], capture_output=True, timeout=120, check=True)
        for budget in (20_000, 40_000, 80_000):  # a loaded machine may need more virtual time to render
            dom = subprocess.run(
                [*flags[:-1], f"--virtual-time-budget={budget}", "--dump-dom", page],
                capture_output=True,
                text=True,
                timeout=180,
                check=True,
            ).stdout
            if "batch-after-expansion [cpu-tiny]" in dom and "matching runs" in dom:
                break
        assert (
            "batch-after-expansion [cpu-tiny]" in dom
        )  # the parent run, rendered by the UI's own JavaScript
        text = re.sub(r"<[^>]+>", "", dom)  # the count is "<strong>4</strong> matching runs"
        assert "4 matching runs" in text
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000  # a rendered page, not a blank one
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
