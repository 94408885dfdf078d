"""Live progress from Ray Train workers to the driver's console.

Ray Train hands metrics to the driver only at the end of a fit, so rank 0 of each phase posts its
latest metrics to a small actor (fire-and-forget, a few hundred bytes per logged step) and a driver
thread polls it once a second to redraw the stage's progress line. The actor takes no CPU slot, lives
as long as the driver, and losing it only stops the live line, never training."""

from __future__ import annotations

import threading
from contextlib import contextmanager


def make_board():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class ProgressBoard:
        def __init__(self):
            self.latest: dict[str, dict] = {}

        def post(self, stage: str, metrics: dict) -> None:
            self.latest[stage] = metrics

        def get(self, stage: str) -> dict | None:
            return self.latest.get(stage)

    return ProgressBoard.remote()


def post(board, stage: str, event: dict, world: int) -> None:
    """Called by rank 0 on every train event; never raises (a lost board must not stop training)."""
    if board is None or event.get("event") != "train":
        return
    try:
        board.post.remote(
            stage, {"tokens": event["tokens"], "train_loss": event.get("train_loss"), "world": world}
        )
    except Exception:  # noqa: BLE001
        pass


@contextmanager
def watch(board, stage: str, console, *, start_tokens: int, end_tokens: int, interval_s: float = 1.0):
    """While the body runs, mirror ``stage``'s metrics on the board into a progress line. The line
    appears with the first metrics (a standby phase 2 shows nothing while it waits) and is closed
    with the last metrics seen when the body ends."""
    import ray

    stop = threading.Event()
    state: dict = {"line": None}

    def apply(m: dict | None) -> None:
        if not m:
            return
        if state["line"] is None:
            state["line"] = console.progress(stage, end_tokens - start_tokens)
        state["line"].update(m["tokens"] - start_tokens, loss=m.get("train_loss"), world=m.get("world"))

    def poll() -> None:
        while not stop.wait(interval_s):
            try:
                apply(ray.get(board.get.remote(stage), timeout=10))
            except Exception:  # noqa: BLE001  (a slow or lost board only pauses the line)
                continue

    thread = threading.Thread(target=poll, name=f"progress-{stage}", daemon=True)
    if board is not None:
        thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if board is not None:
            thread.join(timeout=15)
            try:
                apply(ray.get(board.get.remote(stage), timeout=10))
            except Exception:  # noqa: BLE001
                pass
        if state["line"] is not None:
            state["line"].close(None if ok else "(stopped)")
