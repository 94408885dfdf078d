"""Fault points for the fault matrix (tests/reliability): ``PROGROW_FAULT`` holds one JSON object or a
list. Each fault fires once (its ``marker`` file records it, written whole): at the first metrics event
of ``phase`` on ``rank`` with at least ``at_tokens`` tokens (τ-search probes: ``phase`` "tau-search"
and the probe's ``role``; the single-process CLI: ``phase`` "train").

Actions: the default kills the process abruptly (as a preempted or OOM-killed worker); ``"hold"``
blocks instead, a deterministic point at which a test kills the driver (the stage cannot finish
behind the test's back); ``"pause"`` blocks until the file ``release`` exists, or with ``release:
"preemption"`` until the caller's ``preempted()`` says this worker was told of a node drain (a test
changes the cluster, or reads MLflow, while training stands still, then lets it go on);
``"corrupt_latest"`` lets the caller damage the newest checkpoint first.
``delay_s`` waits first (e.g. until Ray has registered the last reported checkpoint). Unset, nothing
here runs."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

FAULT_ENV = "PROGROW_FAULT"
HOLD_S = 3600.0  # a held process waits here until the test kills it


def hold(released: Callable[[], bool] | None = None) -> None:
    """Block until killed (or until ``released()``), for at most HOLD_S; exit at once if the parent
    process goes away (a test that failed before its kill must not leave a held worker behind)."""
    parent, deadline = os.getppid(), time.time() + HOLD_S
    while time.time() < deadline:
        if os.getppid() != parent:
            os._exit(1)
        if released is not None and released():
            return
        time.sleep(0.2)


def faults_from_env():
    return json.loads(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None


def maybe_inject_fault(
    faults,
    phase: str,
    rank: int,
    tokens: int,
    role: str | None = None,
    corrupt: Callable[[], str | None] | None = None,
    preempted: Callable[[], bool] | None = None,
) -> None:
    for fault in [faults] if isinstance(faults, dict) else faults or []:
        if (
            fault.get("phase") != phase
            or fault.get("rank", 0) != rank
            or tokens < fault["at_tokens"]
            or fault.get("role", role) != role
        ):
            continue
        marker = fault["marker"]
        if os.path.exists(marker):
            continue
        time.sleep(fault.get("delay_s", 0))
        damaged = corrupt() if fault.get("action") == "corrupt_latest" and corrupt is not None else None
        with open(marker + ".tmp", "w") as fh:
            fh.write(
                json.dumps(
                    {"phase": phase, "rank": rank, "tokens": tokens, "pid": os.getpid(), "damaged": damaged}
                )
            )
        os.replace(marker + ".tmp", marker)
        if fault.get("action") == "hold":
            hold()
            raise RuntimeError(f"fault hold at {phase}/{tokens} tokens was never released")
        if fault.get("action") == "pause":
            release = fault["release"]
            if release == "preemption":
                hold(preempted)
            else:
                hold(lambda: os.path.exists(release))
            continue
        os._exit(1)


def corrupt_newest_checkpoint(fit_uri: str) -> str | None:
    """A ``corrupt_latest`` fault: tear the newest committed checkpoint of a Ray fit (directories
    ``checkpoint_<time>``), so that the restart must fall back to the previous one. Returns the
    damaged directory."""
    from ..integrations.storage import list_dirs, read_bytes, write_bytes

    newest = list_dirs(fit_uri, "checkpoint_")[-1:]
    if not newest:
        return None
    manifest = json.loads(read_bytes(f"{newest[0]}/manifest.json") or b"{}")
    victim = (
        "model.pt" if "model.pt" in manifest.get("files", {}) else "shards/__0_0.distcp"
    )  # sharded: rank 0's
    write_bytes(f"{newest[0]}/{victim}", b"torn write")
    return newest[0]
