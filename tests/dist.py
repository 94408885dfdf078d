"""Launch N torch.distributed (gloo) ranks of a test worker module as subprocesses, as torchrun would."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module: str, world: int, *args: str, timeout: float = 600) -> None:
    """Run ``python -m module *args`` as ranks 0..world-1 of one group (env:// rendezvous on loopback);
    raise if any rank fails. Each rank uses one thread, so N ranks share the machine's cores evenly."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1",  # a native abort still prints each thread's Python stack
        }
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env))
    deadline = time.monotonic() + timeout
    try:  # a rank that fails leaves its peers waiting in a collective: stop them all at the first failure
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"{module} ranks exited with {codes} (negative: killed)"
