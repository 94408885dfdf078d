"""Standby phase 2: its fit starts alongside phase 1, its workers start, import and join their process
group, then wait for phase 1's checkpoint. So the switch at τ costs a checkpoint read and the expansion
instead of a worker-group start.

The driver hands the checkpoint over through one small file in run storage (``Handoff``), written
whole; phase 2's fit runs on a driver thread (``StandbyFit``)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..integrations.storage import read_json, write_json


class Handoff:
    """``{"checkpoint_uri": ...}`` once phase 1 ended, or ``{"abort": why}`` when it failed."""

    def __init__(self, uri: str):
        self.uri = uri

    def give(self, checkpoint_uri: str) -> None:
        write_json(self.uri, {"checkpoint_uri": checkpoint_uri})

    def abort(self, why: str) -> None:
        write_json(self.uri, {"abort": why})

    def read(self) -> dict | None:
        return read_json(self.uri)

    def wait(self, timeout_s: float, poll_s: float = 0.1) -> str:
        """Block until the driver hands over phase 1's checkpoint (at most ``timeout_s``: a driver that
        died must not hold the standby workers forever); return its URI."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.read()
            if msg is not None:
                if "abort" in msg:
                    raise RuntimeError(f"standby phase 2 released without a checkpoint: {msg['abort']}")
                return msg["checkpoint_uri"]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "standby phase 2 had no checkpoint from phase 1 after "
                    f"ray.handoff_timeout_s={timeout_s:g} s"
                )
            time.sleep(poll_s)


class StandbyFit:
    """Runs ``fit()`` on a driver thread; ``result()`` joins it and returns its value or raises its error."""

    def __init__(self, fit: Callable[[], object]):
        self._outcome: dict = {}

        def run() -> None:
            try:
                self._outcome["value"] = fit()
            except BaseException as e:  # re-raised on the driver's main thread
                self._outcome["error"] = e

        self._thread = threading.Thread(target=run, name="phase2-standby", daemon=True)
        self._thread.start()

    def release(self, timeout_s: float) -> None:
        """Wait for the thread after an abort, without raising its (consequential) error."""
        self._thread.join(timeout_s)

    def result(self, timeout_s: float | None = None):
        self._thread.join(timeout_s)
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome.get("value")
