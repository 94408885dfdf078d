"""`make setup` on a CPU machine takes the CPU build of torch where a local wheel of it exists, not the
index's multi-GB CUDA build (the Makefile installs that wheel first)."""

import os
import shutil
import sys
from pathlib import Path

import pytest


def local_cpu_wheels(version: str) -> list[Path]:
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d and "://" not in d] + ["/opt/wheels"]
    return [w for d in dirs if Path(d).is_dir() for w in Path(d).glob(f"torch-{version}+cpu-*.whl")]


def test_cpu_machines_get_the_cpu_build_of_torch():
    import torch

    pinned = (
        (Path(__file__).resolve().parents[1] / "constraints-cpu.txt")
        .read_text()
        .split("torch==")[1]
        .split()[0]
    )
    if shutil.which("nvidia-smi") or not local_cpu_wheels(pinned) or not sys.prefix.endswith(".venv"):
        pytest.skip("only where `make setup` had a local CPU wheel of torch to take")
    assert torch.__version__ == f"{pinned}+cpu", torch.__version__
    assert not list(Path(sys.prefix).glob("lib/python*/site-packages/nvidia")), (
        "CUDA libraries were installed"
    )
