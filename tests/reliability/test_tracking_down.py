"""MLflow unreachable or going away: tracking turns itself off with one warning; nothing raises."""

import socket
import time

from progrow_ray.integrations.tracking import Tracker, scrub


def dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server_costs_one_warning_and_seconds():
    logs = []
    t0 = time.time()
    tracker = Tracker(dead_uri(), "exp", log=logs.append)
    assert time.time() - t0 < 10  # MLflow's own client would retry for minutes
    rid = tracker.start_run("parent", params={"a": 1})
    tracker.log_history(rid, [{"event": "train", "step": 1, "tokens": 1, "flops": 1.0, "train_loss": 1.0}])
    tracker.log_metrics(rid, {"x": 1.0})
    tracker.end(rid)
    assert rid is None and not tracker.enabled
    assert len(logs) == 1 and "unavailable" in logs[0] and "training continues" in logs[0]


def test_server_lost_mid_run_turns_tracking_off(tmp_path):
    logs = []
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "exp", log=logs.append)
    rid = tracker.start_run("parent")
    assert rid and tracker.enabled

    def broken(*a, **k):
        raise ConnectionError("server went away")

    tracker.client.log_batch = broken
    for _ in range(3):
        tracker.log_metrics(rid, {"x": 1.0})
    assert not tracker.enabled and len(logs) == 1


def test_scrub_masks_values_that_contain_a_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert scrub({"a": "x-s3cr3t-value-y", "b": 2}) == {"a": "***", "b": "2"}
