"""``python -m progrow_ray.bench prepare [--mb 12]``: ``data prepare`` tokens/s for one process (one
tokeniser thread), every local core (the local engine's default) and Ray Data on a local cluster of every
core, on the same slice of the standard library's source (no download). Ratios are to one process,
measured in the same run; the Ray Data run also checks that its shards are byte-identical to the local
engine's."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from ..data.prepare import PrepareSettings, prepare


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).glob("*.npy")):
        h.update(p.read_bytes())
    return h.hexdigest()


def prepare_bench(mb: float = 12.0, ray_data: bool = True) -> dict:
    settings = PrepareSettings(0.02, max_source_bytes=int(mb * 1e6))
    cores = os.cpu_count() or 1
    rows, digests = [], {}
    from ..data.tokenizer import gpt2_encoding

    gpt2_encoding()  # built once per process: not part of any engine's time
    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, **kw) -> None:
            out = os.path.join(tmp, name)
            started = time.perf_counter()
            meta = prepare("stdlib", out, settings, progress=False, log=lambda _: None, **kw)
            seconds = time.perf_counter() - started
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            rows.append(
                {"engine": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            )
            digests[name] = _digest(out)

        run("one process", threads=1)
        run(f"all {cores} cores", threads=cores)
        if ray_data:
            import ray

            from ..orchestration.prepare_ray import ray_tokens

            ray.init(num_cpus=cores, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
            try:
                run(f"Ray Data ({cores} CPUs)", tokens=ray_tokens)
            finally:
                ray.shutdown()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_one_process"] = r["tokens_per_s"] / base
    return {"source_mb": mb, "cores": cores, "rows": rows, "identical": len(set(digests.values())) == 1}
