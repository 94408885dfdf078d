import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from progrow_ray.engine import Trainer

from .conftest import make_cfg

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(prepared, tmp_path):
    """Same global batch over 2 DDP ranks (with expansion and a batch change at τ) gives the same
    losses as one process, up to float summation order."""
    port, result = free_port(), tmp_path / "ddp.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.engine.ddp_worker",
                str(r),
                "2",
                str(port),
                prepared,
                str(tmp_path / "ddp"),
                str(result),
            ],
            cwd=ROOT,
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ddp = json.loads(result.read_text())
    events = []
    cfg = make_cfg(prepared, str(tmp_path / "single"), growth={"tau_frac": 0.25, "batch_tokens_after": 1024})
    single = Trainer(cfg, on_metrics=events.append, log=lambda _: None).run()
    one = [(e["step"], e["depth"], e["train_loss"]) for e in events if e["event"] == "train"]
    two = [(e["step"], e["depth"], e["train_loss"]) for e in ddp["events"] if e["event"] == "train"]
    assert [s[:2] for s in one] == [s[:2] for s in two]
    for (_, _, a), (_, _, b) in zip(one, two):
        assert a == pytest.approx(b, rel=2e-4)
    assert ddp["result"]["val_loss"] == pytest.approx(single.val_loss, rel=2e-4)
