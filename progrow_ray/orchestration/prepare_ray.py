"""``prepare`` on Ray Data: the files are read and tokenised across the cluster (``map_batches``, one task
per group of consecutive files, streamed a batch of documents at a time), and the driver writes the shards
from the ordered
result stream. The shard writer and the document order are the local engine's (``data/prepare.py``), so
the output is byte-identical to it for the same input.
"""

from __future__ import annotations

import numpy as np

from ..data.prepare import TokenStream, batched_tokens, file_documents, file_groups
from ..data.sources import SourceFile

THREADS_PER_TASK = 1  # Ray Data gives every CPU its own task: no tokeniser threads inside one


def _tokenise(batch: dict):
    """One group of files (a batch of one row) -> their documents' tokens, streamed in batches."""
    files = [
        SourceFile(u, n, int(z), "")
        for u, n, z in zip(batch["urls"][0], batch["names"][0], batch["sizes"][0])
    ]
    first = int(batch["first"][0])
    out: dict[str, list] = {"file": [], "doc": [], "tokens": []}
    index = {f.name: first + k for k, f in enumerate(files)}
    for name, i, arr in batched_tokens(file_documents(files), THREADS_PER_TASK):
        out["file"].append(index[name])
        out["doc"].append(i)
        out["tokens"].append(arr.tobytes())
        if len(out["doc"]) >= 4096:
            yield _columns(out)
            out = {"file": [], "doc": [], "tokens": []}
    if out["doc"]:
        yield _columns(out)


def _columns(out: dict) -> dict:
    return {
        "file": np.array(out["file"]),
        "doc": np.array(out["doc"]),
        "tokens": np.array(out["tokens"], dtype=object),
    }


def task_rows(files: list[SourceFile], cpus: int) -> list[dict]:
    """One row per task: consecutive files in groups of about total / (4 x CPUs) bytes (at least 1 MB),
    enough tasks to keep every CPU busy, few enough that many small files are not a task each."""
    target = max(1 << 20, sum(f.size for f in files) // max(1, 4 * cpus))
    rows, first = [], 0
    for group in file_groups(files, target):
        rows.append(
            {
                "first": first,
                "urls": [f.url for f in group],
                "names": [f.name for f in group],
                "sizes": [f.size for f in group],
            }
        )
        first += len(group)
    return rows


def ray_tokens(files: list[SourceFile], cpus_per_task: float = 1.0) -> TokenStream:
    """The token stream of ``files`` computed by Ray Data on the connected cluster, in the local engine's
    order (``preserve_order``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    rows = task_rows(files, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _tokenise, batch_size=1, num_cpus=cpus_per_task
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, doc, raw in zip(batch["file"], batch["doc"], batch["tokens"]):
            yield files[int(index)].name, int(doc), np.frombuffer(raw, dtype=np.uint16)
