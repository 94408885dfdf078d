"""Live metrics from Ray Train workers to the driver: the console line, MLflow, and the elastic events.

Rank 0 of each fit posts its logged steps, checkpoints and (re)starts to a small actor, the board
(fire-and-forget, a few hundred bytes per logged step; ``phases.post``). A driver thread drains the
board once a second: it redraws the phase's progress line, logs the new
events to the phase's MLflow run (which exists from the phase's start), and turns the workers'
"start" reports into elastic events: each restart of the worker group, at which size, from which
checkpoint, and what it cost. The board takes no CPU slot, lives as long as the driver, and losing it
only stops the live view, never training."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field


def make_board():
    """The board, on the driver's node: a worker node may be lost (or drained) mid-phase, the driver's
    goes only with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)
    class ProgressBoard:
        def __init__(self):
            self.events: dict[str, list] = {}
            self.controllers: dict = {}

        def post(self, stage: str, metrics: dict) -> None:
            self.events.setdefault(stage, []).append(metrics)

        def since(self, stage: str, n: int) -> list:
            return self.events.get(stage, [])[n:]

        def set_controller(self, stage: str, handle) -> None:
            """The stage's Ray Train controller (its workers know it), so the driver can stop the fit."""
            self.controllers[stage] = handle

        def controller(self, stage: str):
            return self.controllers.get(stage)

    return ProgressBoard.remote()


@dataclass
class ElasticLog:
    """The worker group's restarts within one phase, from the events the workers report: a restart is a
    "start" after the first; the work lost is what was trained after the checkpoint it resumed."""

    events: list = field(default_factory=list)  # what report.json / MLflow get
    _world: int | None = None
    _last_train: dict | None = None  # the newest train event before a restart
    _preempted: bool = False  # a preemption checkpoint since the last start
    _pending: dict | None = None  # a restart whose first step has not come yet

    def add(self, e: dict) -> dict | None:
        """Feed one reported event; returns an elastic event once it is complete (its first step at the
        new size has come), else None."""
        kind = e.get("event")
        if kind == "checkpoint" and e.get("reason") == "preemption":
            self._preempted = True
        elif kind == "start":
            world = int(e["world_size"])
            if self._world is not None:
                before = self._last_train or {}
                cause = (
                    "preemption"
                    if self._preempted
                    else "capacity lost"
                    if world < self._world
                    else "capacity added"
                    if world > self._world
                    else "worker failure"
                )
                self._pending = {
                    "time": e["time"],
                    "tokens": int(e["tokens"]),
                    "from_workers": self._world,
                    "to_workers": world,
                    "cause": cause,
                    "tokens_recomputed": max(0, int(before.get("tokens", e["tokens"])) - int(e["tokens"])),
                    "last_step_time": before.get("time"),
                }
            self._world, self._preempted = world, False
        elif kind == "train":
            self._last_train = e
            if self._pending is not None:
                done, self._pending = self._pending, None
                last = done.pop("last_step_time")
                done["first_step_s"] = e["time"] - done["time"]  # worker start + restore + one log interval
                done["wall_lost_s"] = e["time"] - last if last is not None else None
                self.events.append(done)
                return done
        return None


@dataclass
class LiveView:
    """What ``watch`` saw of a phase: its elastic events and, per event kind, the newest step it streamed
    to MLflow (a restart re-trains steps already streamed: they are not streamed twice)."""

    elastic: ElasticLog = field(default_factory=ElasticLog)
    streamed: dict = field(default_factory=dict)


class PhaseMonitor:
    """Drains one phase's events from the board; ``on_event`` gets each, in order."""

    def __init__(self, board, stage: str, on_event):
        self.board, self.stage, self.on_event = board, stage, on_event
        self.seen = 0

    def drain(self) -> None:
        import ray

        for e in ray.get(self.board.since.remote(self.stage, self.seen), timeout=10):
            self.seen += 1
            self.on_event(e)


@contextmanager
def watch(
    board,
    stage: str,
    console,
    *,
    start_tokens: int,
    end_tokens: int,
    tracker=None,
    run_id: str | None = None,
    on_first_step=None,
    interval_s: float = 1.0,
):
    """While the body runs, mirror ``stage``'s reported events: a progress line (it appears with the
    first step, so a standby phase 2 shows nothing while it waits), the MLflow run ``run_id``, and the
    elastic events (the yielded ``LiveView``); ``on_first_step`` runs once the phase trains. The line is
    closed with the last metrics when the body ends."""
    stop = threading.Event()
    state: dict = {"line": None}
    live = LiveView()

    def on_event(e: dict) -> None:
        resized = live.elastic.add(e)
        if resized is not None:
            console.info(
                f"{stage}: workers {resized['from_workers']} -> {resized['to_workers']} "
                f"({resized['cause']}) at {resized['tokens']:,} tokens; "
                f"{resized['tokens_recomputed']:,} tokens recomputed"
            )
        kind = e.get("event")
        if kind in ("train", "eval") and tracker is not None and run_id and tracker.enabled:
            if e["step"] > live.streamed.get(kind, -1):
                tracker.log_history(run_id, [e])
                if tracker.enabled:  # logged (a failure turns tracking off)
                    live.streamed[kind] = int(e["step"])
        if e.get("event") != "train":
            return
        if state["line"] is None:
            state["line"] = console.progress(stage, end_tokens - start_tokens)
            if on_first_step is not None:
                on_first_step()
        state["line"].update(e["tokens"] - start_tokens, loss=e.get("train_loss"), world=e.get("world_size"))

    monitor = PhaseMonitor(board, stage, on_event) if board is not None else None

    def poll() -> None:
        warned = False
        while not stop.wait(interval_s):
            try:
                monitor.drain()
            except Exception as e:  # noqa: BLE001  (a slow or lost board only pauses the view)
                if not warned:
                    console.info(f"warning: the live view of {stage} paused ({type(e).__name__}: {e})")
                    warned = True

    thread = threading.Thread(target=poll, name=f"progress-{stage}", daemon=True)
    if monitor is not None:
        thread.start()
    ok = False
    try:
        yield live
        ok = True
    finally:
        stop.set()
        if monitor is not None:
            thread.join(timeout=15)
            try:
                monitor.drain()
            except Exception:  # noqa: BLE001
                pass
        if state["line"] is not None:
            state["line"].close(None if ok else "(stopped)")
