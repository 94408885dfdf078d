"""Tokenise a text source once into uint16 token shards plus ``meta.json``, local or on S3.

Layout of ``DST``::

    meta.json            written last: its presence means the shards are complete
    train_00000.npy ...  uint16 GPT-2 tokens, documents joined by <|endoftext|>
    val_00000.npy ...

The train/val split is per document, by a hash of the document's name (file path + index in the
file), so it is deterministic and stable when files are added. Re-running with the same inputs and
settings finds ``meta.json`` with the same fingerprint and does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import types
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..core.errors import ConfigError, require
from ..integrations.storage import filesystem
from .sources import PART_BYTES, TEXT_PIECE_BYTES, Part, SourceFile, list_files, parts, read_documents, read_part
from .tokenizer import EOT, VOCAB_SIZE, gpt2_encoding

FORMAT = "progrow_ray.tokens.v1"
META = "meta.json"


@dataclass(frozen=True)
class PrepareSettings:
    val_fraction: float = 0.02
    shard_tokens: int = 50_000_000
    max_source_bytes: int | None = None

    def __post_init__(self) -> None:
        require(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        require(self.shard_tokens > 0, f"shard_tokens must be > 0, got {self.shard_tokens}")
        require(self.max_source_bytes is None or self.max_source_bytes > 0, "data.max_source_bytes must be > 0")


def fingerprint(source: str, files: list[SourceFile], settings: PrepareSettings) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, source, settings.__dict__], sort_keys=True).encode())
    for f in files:
        h.update(f"{f.name}\0{f.size}\0{f.version}\n".encode())
    return h.hexdigest()


def is_val(doc_name: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(doc_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def read_meta(dst: str) -> dict | None:
    fs, path = filesystem(dst)
    meta_path = _join(path, META)
    if not fs.exists(meta_path):
        return None
    with fs.open(meta_path, "rb") as fh:
        try:
            return json.loads(fh.read())
        except json.JSONDecodeError:
            return None  # a torn write: treat as not prepared


class _ShardWriter:
    def __init__(self, fs, root: str, split: str, shard_tokens: int):
        self.fs, self.root, self.split, self.shard_tokens = fs, root, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.documents += 1
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        joined = np.concatenate(self.buffer)
        shard, rest = joined[:n], joined[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}_{len(self.shards):05d}.npy"
        out = io.BytesIO()
        np.save(out, shard, allow_pickle=False)
        data = out.getvalue()
        with self.fs.open(_join(self.root, name), "wb") as fh:
            fh.write(data)
        self.shards.append({"file": name, "tokens": int(len(shard)), "sha256": sha256_bytes(data)})

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


# A (document name, index in its file, tokens + <|endoftext|>) stream, in file order then document order:
# what an engine produces and the shard writer consumes. Any engine that keeps this order writes the same
# bytes.
TokenStream = Iterator[tuple[str, int, np.ndarray]]
BATCH_BYTES = 2 << 20  # documents tokenised together: memory stays bounded (~40 MB), every core is busy


def within_budget(files: list[SourceFile], settings: PrepareSettings) -> list[SourceFile]:
    """The files ``prepare`` reads: in order, while fewer than ``max_source_bytes`` have been read."""
    if settings.max_source_bytes is None:
        return files
    out, read = [], 0
    for f in files:
        if read >= settings.max_source_bytes:
            break
        out.append(f)
        read += f.size
    return out


def _one(enc, doc: str) -> np.ndarray:
    ids = enc.encode_to_numpy(doc, disallowed_special=())  # no special tokens: encode_ordinary's ids
    arr = np.empty(len(ids) + 1, dtype=np.uint16)
    arr[:-1] = ids
    arr[-1] = EOT
    return arr


def encode(enc, docs: list[str], threads: int) -> list[np.ndarray]:
    """GPT-2 tokens of each document plus its <|endoftext|>, as uint16. tiktoken encodes into a buffer
    in native code without the GIL: ``threads`` cores, no processes, no Python ints."""
    if threads <= 1 or len(docs) <= 1:
        return [_one(enc, d) for d in docs]
    return list(_pool(threads).map(lambda d: _one(enc, d), docs))


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="tokenise")


def batched_tokens(docs: Iterator[tuple[str, int, str]], threads: int, batch_bytes: int = BATCH_BYTES) -> TokenStream:
    """(name, index, text) documents -> (name, index, tokens), tokenised a batch of documents at a time
    (across files: many small files keep every thread busy too)."""
    enc = gpt2_encoding()
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[2])
        if size >= batch_bytes:
            yield from _encoded(enc, batch, threads)
            batch, size = [], 0
    yield from _encoded(enc, batch, threads)


def _encoded(enc, batch, threads) -> TokenStream:
    for (name, i, _), arr in zip(batch, encode(enc, [d[2] for d in batch], threads)):
        yield name, i, arr


def file_documents(files: list[SourceFile], bar=None) -> Iterator[tuple[str, int, str]]:
    for f in files:
        for i, text in enumerate(read_documents(f)):
            yield f.name, i, text
        if bar is not None:
            bar.update(f.size)


def file_groups(files: list[SourceFile], target_bytes: int) -> list[list[SourceFile]]:
    """Consecutive files in groups of at least ``target_bytes`` (a large file is a group of its own)."""
    groups, current, size = [], [], 0
    for f in files:
        current.append(f)
        size += f.size
        if size >= target_bytes:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


# A unit of work for one tokeniser process: parts of consecutive files, about this many bytes of source.
UNIT_BYTES = 1 << 20
IN_FLIGHT_PER_WORKER = 8  # units queued per process: a slow unit at the head of the line idles no one
IN_FLIGHT_BYTES_PER_WORKER = 32 << 20  # ... and at most this much source per process
_encoding = None  # a tokeniser process's copy of the encoding


def _start_worker(encoding_file: str, environ: dict[str, str], everyone) -> None:
    """Take the parent's environment as it is now (the fork server holds the one it started with:
    credentials and endpoints may have changed since), load the encoding the parent pickled (~40 ms;
    building it takes ~1 s), and wait for the other processes of the pool to start."""
    global _encoding
    os.environ.clear()
    os.environ.update(environ)
    with open(encoding_file, "rb") as fh:
        _encoding = pickle.load(fh)
    everyone.wait(timeout=300)


def work_units(files: list[SourceFile], unit_bytes: int = UNIT_BYTES) -> Iterator[list[Part] | SourceFile]:
    """What the local engine hands its processes, in file order: lists of parts of about ``unit_bytes``
    (small files together, long jsonl and parquet files cut into parts), or a file this process streams
    itself, a batch of documents at a time: a long text file (its pieces end at blank lines, found only by
    reading it) or a parquet file with a row group too large to hold whole in a tokeniser process."""
    current, size = [], 0
    for f in files:
        long_text = f.size > TEXT_PIECE_BYTES and not f.url.endswith((".jsonl", ".parquet"))
        file_parts = [] if long_text else parts(f, PART_BYTES)
        # a parquet row group over 4 parts is streamed here instead: a tokeniser process holds a part whole
        if not file_parts or max(p.size for p in file_parts) > 4 * PART_BYTES:
            if current:
                yield current
            yield f
            current, size = [], 0
            continue
        for p in file_parts:
            current.append(p)
            size += p.size
            if size >= unit_bytes:
                yield current
                current, size = [], 0
    if current:
        yield current


def _unit_tokens(unit: list[Part]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """One unit in a tokeniser process: (documents in each part, each document's length, all the tokens
    in one array): three objects to send back, not one per document."""
    enc = _encoding or gpt2_encoding()
    counts, arrays = [], []
    for p in unit:
        before = len(arrays)
        arrays += [_one(enc, doc) for doc in read_part(p)]
        counts.append(len(arrays) - before)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    return counts, lengths, (np.concatenate(arrays) if arrays else np.empty(0, np.uint16))


def _unpacked(unit: list[Part], result, seen: dict[str, int], bar) -> TokenStream:
    counts, lengths, tokens = result
    ends = np.cumsum(lengths)
    k = 0
    for p, n in zip(unit, counts):
        first = seen.get(p.file.name, 0)  # a part's documents continue its file's numbering
        for j in range(n):
            yield p.file.name, first + j, tokens[ends[k] - lengths[k]: ends[k]]
            k += 1
        seen[p.file.name] = first + n
    if bar is not None:
        bar.update(sum(p.size for p in unit))


def _tokeniser_context():
    """Forkserver: the server is a fresh process (nothing forked from a threaded parent such as a Ray
    driver) that imports this module once; each pool's processes fork from it in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@contextlib.contextmanager
def _without_main():
    """A new process re-imports the parent's ``__main__`` (a user's script, ``progrow_ray.train`` with
    torch...) unless it has none: hide it while the tokeniser processes start."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start_pool(workers: int, encoding_file: str) -> ProcessPoolExecutor:
    """``workers`` tokeniser processes, every one started now: each waits in its initializer for the
    others, so the ``workers`` first tasks start ``workers`` processes, all without ``__main__``."""
    ctx = _tokeniser_context()
    everyone = ctx.Barrier(workers)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(encoding_file, dict(os.environ), everyone))
    try:
        with _without_main():  # each submit starts a process: none can finish before the last has started
            started = [pool.submit(os.getpid) for _ in range(workers)]
        for f in started:
            f.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    return pool


def local_tokens(files: list[SourceFile], workers: int, bar=None) -> TokenStream:
    """The local engine: ``workers`` tokeniser processes (no GIL shared), each reading and tokenising a
    unit of parts of files at a time; results in file order, with at most ``IN_FLIGHT_PER_WORKER`` units
    and ``IN_FLIGHT_BYTES_PER_WORKER`` bytes of source per process in flight, so memory stays bounded
    whatever the corpus's size. One worker: this process alone, streaming."""
    if workers <= 1:
        yield from batched_tokens(file_documents(files, bar), 1)
        return
    with tempfile.TemporaryDirectory(prefix="progrow-tokeniser-") as tmp:
        encoding_file = os.path.join(tmp, "gpt2.pickle")
        with open(encoding_file, "wb") as fh:
            pickle.dump(gpt2_encoding(), fh)
        pool = _start_pool(workers, encoding_file)
        yield from _pooled(pool, files, workers, bar)


def _pooled(pool: ProcessPoolExecutor, files: list[SourceFile], workers: int, bar) -> TokenStream:
    pending: deque = deque()  # (unit, its bytes of source, future), oldest first
    seen: dict[str, int] = {}  # documents so far in each file
    in_flight = 0  # bytes of source in ``pending``

    def oldest() -> TokenStream:
        nonlocal in_flight
        unit, size, future = pending.popleft()
        in_flight -= size
        return _unpacked(unit, future.result(), seen, bar)

    finished = False
    try:
        for unit in work_units(files):
            if isinstance(unit, SourceFile):  # streamed here, encoded on threads
                while pending:
                    yield from oldest()
                yield from batched_tokens(file_documents([unit], bar), workers)
                continue
            size = sum(p.size for p in unit)
            pending.append((unit, size, pool.submit(_unit_tokens, unit)))
            in_flight += size
            while pending and (len(pending) >= IN_FLIGHT_PER_WORKER * workers
                               or in_flight >= IN_FLIGHT_BYTES_PER_WORKER * workers):
                yield from oldest()
        while pending:
            yield from oldest()
        finished = True
    finally:
        # every result in: the processes exit on their own; an error or an abandoned stream: stop them now
        pool.shutdown(wait=not finished, cancel_futures=True)


def prepare(source: str, dst: str, settings: PrepareSettings = PrepareSettings(), *,
            progress: bool = True, log: Callable[[str], None] = print,
            tokens: Callable[[list[SourceFile]], TokenStream] | None = None, workers: int | None = None) -> dict:
    """Tokenise ``source`` into ``dst``; returns the metadata. A no-op when ``dst`` is up to date.
    ``tokens(files)`` is the engine (default: ``workers`` tokeniser processes, one per core);
    the Ray Data engine (``orchestration/prepare_ray.py``) passes its own and writes the same bytes."""
    files = list_files(source)
    fp = fingerprint(source, files, settings)
    existing = read_meta(dst)
    if existing and existing.get("fingerprint") == fp:
        log(f"{dst}: up to date ({existing['splits']['train']['tokens']:,} train tokens), nothing to do")
        return existing

    fs, root = filesystem(dst)
    try:
        fs.makedirs(root, exist_ok=True)
        if existing is not None:  # stale: unpublish before rewriting shards
            fs.rm(_join(root, META))
    except (PermissionError, OSError) as e:
        raise ConfigError(f"data.uri {dst}: cannot write there ({type(e).__name__}: {e})") from e
    used = within_budget(files, settings)
    writers = {s: _ShardWriter(fs, root, s, settings.shard_tokens) for s in ("train", "val")}
    from tqdm.auto import tqdm  # here: the tokeniser processes import this module and never draw a bar

    # disable=None: a bar on a terminal only, never a wall of carriage returns in a log
    bar = tqdm(total=sum(f.size for f in used), unit="B", unit_scale=True, desc="tokenising",
               disable=None if progress else True)
    stream = tokens(used) if tokens is not None else local_tokens(used, workers or os.cpu_count() or 1, bar)
    try:
        for name, i, arr in stream:
            writers["val" if is_val(f"{name}#{i}", settings.val_fraction) else "train"].add(arr)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # a writer's error: the engine's processes stop now, not at garbage collection
            close()
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    require(splits["train"]["tokens"] > 0, f"data.source {source!r}: the corpus is empty after tokenising")
    require(splits["val"]["tokens"] > 0,
            f"data.source {source!r}: no document fell in the validation split; raise data.val_fraction "
            f"({settings.val_fraction}) or add documents")
    meta = {
        "format": FORMAT,
        "tokenizer": {"name": "gpt2", "vocab_size": VOCAB_SIZE, "eot": EOT, "dtype": "uint16"},
        "source": source,
        "fingerprint": fp,
        "settings": settings.__dict__,
        "files": len(files),
        "splits": splits,
    }
    with fs.open(_join(root, META), "wb") as fh:  # written last: publishes the shards
        fh.write(json.dumps(meta, indent=2).encode())
    log(f"{dst}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
        f"from {len(files)} files")
    return meta


def prepare_run_data(data, log: Callable[[str], None] = print) -> dict:
    """The shards a run's ``data`` section (``engine.config.DataSection``) names, tokenised from its
    ``source`` when they are missing or stale; a no-op when they are up to date, and for generated
    images (nothing to prepare: they are made as training reads them)."""
    from .images import SYNTHETIC_IMAGES

    if data.source == SYNTHETIC_IMAGES:
        return {}
    settings = PrepareSettings(data.val_fraction, max_source_bytes=data.max_source_bytes)
    return prepare(data.source, data.uri, settings, log=log)
