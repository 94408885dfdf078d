"""``python -m progrow_ray.bench prepare [--mb 96]``: ``data prepare`` tokens/s for one process, one
tokeniser process per core (the local engine's default) and Ray Data on a local cluster of every core, on
the same corpus: ``--mb`` MB of the standard library's source (no download). Ratios are to one process,
measured in the same run; the Ray Data run also checks that its shards are byte-identical to the local
engine's. With ``repeat`` > 1 the two local engines run alternately that many times and each keeps its
best time: a shared host's noise only ever slows a run down, and both engines meet the same spells of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..data.prepare import PrepareSettings, prepare
from ..data.sources import list_files


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).glob("*.npy")):
        h.update(p.read_bytes())
    return h.hexdigest()


def bench_corpus(root: str, mb: float) -> str:
    """``mb`` MB of the standard library's source as .txt files under ``root`` (as many copies of it as
    that takes, each file one document as in ``stdlib``): a corpus larger than the 32 MB the standard
    library has, so the engines' start-up is a small part of the time, as it is on a real corpus."""
    target, written, copy = int(mb * 1e6), 0, 0
    while written < target:
        for f in list_files("stdlib"):
            dst = os.path.join(root, f"copy{copy}", f.name + ".txt")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(f.url, dst)
            written += f.size
            if written >= target:
                break
        copy += 1
    return root


def prepare_bench(mb: float = 96.0, ray_data: bool = True, repeat: int = 1) -> dict:
    # shards of 1M tokens: as in a real corpus (200 shards of 50M for 10B tokens), all but the last shard
    # are written while the tokenisers run; one 50M-token shard would leave the whole write to the end
    settings = PrepareSettings(0.02, shard_tokens=1_000_000)
    cores = os.cpu_count() or 1
    rows, digests = [], {}
    from ..data.tokenizer import gpt2_encoding

    gpt2_encoding()  # built once per process: not part of any engine's time
    with tempfile.TemporaryDirectory() as tmp:
        source = bench_corpus(os.path.join(tmp, "corpus"), mb)

        def run(name: str, **kw) -> None:
            out = os.path.join(tmp, name)
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            meta = prepare(source, out, settings, progress=False, log=lambda _: None, **kw)
            seconds = time.perf_counter() - started
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            row = next((r for r in rows if r["engine"] == name), None)
            if row is None:
                rows.append({"engine": name, "tokens": tokens, "seconds": seconds, "runs": [seconds]})
            else:
                row["runs"].append(seconds)
                row["seconds"] = min(row["runs"])
            digests[name] = _digest(out)

        for _ in range(max(1, repeat)):  # alternately: both engines meet the same spells of host noise
            run("one process", workers=1)
            run(f"all {cores} cores", workers=cores)
        if ray_data:
            import ray

            from ..orchestration.prepare_ray import ray_tokens

            ray.init(num_cpus=cores, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
            try:
                run(f"Ray Data ({cores} CPUs)", tokens=ray_tokens)
            finally:
                ray.shutdown()
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["vs_one_process"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {
        "source_mb": mb,
        "cores": cores,
        "repeat": max(1, repeat),
        "rows": rows,
        "identical": len(set(digests.values())) == 1,
    }
