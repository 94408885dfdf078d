import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import BASE

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, corpus: Path, data_uri: str, out: Path) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["out"] = str(out)
    cfg["data"].update(source=str(corpus), uri=data_uri, val_fraction=0.15)
    cfg["train"].update(total_tokens=16384, checkpoint_every_tokens=2048)
    path.write_text(yaml.safe_dump(cfg))
    return path


def per_step_losses(run_dir: Path) -> dict[int, float]:
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "train":
            last[e["step"]] = e["train_loss"]  # a resumed run re-logs the steps after its checkpoint
    return last


def train(config: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "progrow_ray.train", "--config", str(config), "--no-progress", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_killed_run_resumes_to_identical_losses(text_corpus, prepared, tmp_path):
    full_cfg = write_config(tmp_path / "full.yaml", text_corpus, prepared, tmp_path / "full")
    p = train(full_cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "summary:" in out and "final val loss" in out

    cfg = write_config(tmp_path / "kill.yaml", text_corpus, prepared, tmp_path / "kill")
    held = tmp_path / "held.json"  # the run blocks at 10240 tokens (after 4 checkpoints) until it is killed
    hold = {"phase": "train", "at_tokens": 10240, "action": "hold", "marker": str(held)}
    p = train(cfg, env={**os.environ, "PROGROW_FAULT": json.dumps(hold)})
    deadline = time.time() + 240
    try:
        while not held.exists():
            assert p.poll() is None and time.time() < deadline, (
                p.stdout.read()[-2000:] if p.poll() is not None else ""
            )
            time.sleep(0.2)
    finally:
        p.send_signal(
            signal.SIGKILL
        )  # no clean-up, no final checkpoint (and none left behind if the test failed)
        p.wait()
    first = per_step_losses(tmp_path / "kill" / "t")
    assert max(first) == 20, "held at 10240 tokens = step 20 of 32"
    p = train(cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resuming from" in out
    assert per_step_losses(tmp_path / "kill" / "t") == per_step_losses(tmp_path / "full" / "t")


def test_bad_config_is_one_line_and_exit_2(tmp_path, prepared, text_corpus):
    cfg = write_config(tmp_path / "c.yaml", text_corpus, prepared, tmp_path / "o")
    p = train(cfg, "--set", "growth.tau_frac=0.95")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2
    assert out.strip().startswith("error: growth tau") and out.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()  # nothing written


def test_train_cli_reads_the_pipeline_presets():
    """`python -m progrow_ray.train --config jobs/smoke.yaml` takes a pipeline preset; the Ray-only
    sections are not its business (typos inside them are the pipeline's to report)."""
    from progrow_ray.orchestration.config import load_single_run

    cfg = load_single_run(ROOT / "jobs" / "smoke.yaml", [])
    assert cfg.name == "smoke" and cfg.growth.batch_tokens_after == 8192
