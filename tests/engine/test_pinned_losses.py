"""The smoke preset's per-step losses on CPU, pinned to the values the engine gave before the refactor of
issue 13 (``pinned_losses.json``, floats in hex). A change above the core that alters what trains -- data
order, initialisation, the optimizer step, the schedule position, the expansion -- fails here.

Bit for bit on the machine that wrote them; CPUs of another generation round some kernels differently (an
AMD EPYC gave 3e-7 relative from step 4 on), so the check is 2e-6 relative, an order above that and orders
below what any change of what trains moves the loss by.

Regenerate only for an intended change of the numerics:
``.venv/bin/python -m tests.engine.test_pinned_losses > tests/engine/pinned_losses.json``."""

import json
import sys
from pathlib import Path

import pytest
import torch

from progrow_ray.data.prepare import PrepareSettings, prepare
from progrow_ray.engine import Trainer
from progrow_ray.orchestration.config import load_single_run

PINNED = Path(__file__).with_name("pinned_losses.json")
SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml"
# (name, overrides, until_tokens): the preset as shipped, and with τ moved to the second step so that the
# expansion and the 4x batch after it are inside a few steps
CASES = [
    ("smoke", [], 12_288),
    ("smoke-tau-4096", ["growth.tau_tokens=4096"], 20_480),
]


def smoke_data(root: Path) -> str:
    """The smoke preset's corpus (the standard library's source, first 8 MB), prepared once per session."""
    uri = str(root / "stdlib-gpt2")
    cfg = load_single_run(SMOKE)
    prepare(
        "stdlib",
        uri,
        PrepareSettings(cfg.data.val_fraction, max_source_bytes=cfg.data.max_source_bytes),
        progress=False,
        log=lambda _: None,
    )
    return uri


def run_case(data_uri: str, out: str, overrides: list[str], until: int) -> dict:
    torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
    cfg = load_single_run(SMOKE, [f"data.uri={data_uri}", f"out={out}", "train.log_every=1", *overrides])
    trainer = Trainer(cfg, save_checkpoint=lambda *_: None, log=lambda _: None)
    trainer.run(until_tokens=until)
    train = [e for e in trainer.history if e["event"] == "train"]
    return {
        "steps": [e["step"] for e in train],
        "tokens": [e["tokens"] for e in train],
        "depth": [e["depth"] for e in train],
        "train_loss": [float(e["train_loss"]).hex() for e in train],
        "val_loss": float(trainer.evaluate()).hex(),
    }


@pytest.fixture(scope="module")
def smoke_uri(tmp_path_factory) -> str:
    return smoke_data(tmp_path_factory.mktemp("smoke-data"))


@pytest.mark.parametrize("name,overrides,until", CASES, ids=[c[0] for c in CASES])
def test_smoke_losses_match_the_pinned_ones(smoke_uri, tmp_path, name, overrides, until):
    expected = json.loads(PINNED.read_text())[name]
    got = run_case(smoke_uri, str(tmp_path), overrides, until)
    assert got["steps"] == expected["steps"] and got["depth"] == expected["depth"]
    got_losses = [float.fromhex(x) for x in got["train_loss"]]
    expected_losses = [float.fromhex(x) for x in expected["train_loss"]]
    assert got_losses == pytest.approx(expected_losses, rel=2e-6, abs=0), (got_losses, expected_losses)
    assert float.fromhex(got["val_loss"]) == pytest.approx(
        float.fromhex(expected["val_loss"]), rel=2e-6, abs=0
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        uri = smoke_data(Path(tmp))
        json.dump(
            {name: run_case(uri, tmp, over, until) for name, over, until in CASES}, sys.stdout, indent=1
        )
        print()
