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

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..core.errors import ConfigError, require
from ..integrations.storage import filesystem
from .sources import SourceFile, list_files, read_documents
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


def prepare(source: str, dst: str, settings: PrepareSettings = PrepareSettings(), *,
            progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Tokenise ``source`` into ``dst``; returns the metadata. A no-op when ``dst`` is up to date."""
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
    enc = gpt2_encoding()
    writers = {s: _ShardWriter(fs, root, s, settings.shard_tokens) for s in ("train", "val")}
    total = sum(f.size for f in files)
    budget = settings.max_source_bytes if settings.max_source_bytes is not None else total
    threads = os.cpu_count() or 1
    # disable=None: a bar on a terminal only, never a wall of carriage returns in a log
    bar = tqdm(total=min(total, budget), unit="B", unit_scale=True, desc="tokenising", disable=None if progress else True)
    read = 0
    for f in files:
        if read >= budget:
            break
        docs = list(read_documents(f))
        # tiktoken's batch encoder runs in native threads without the GIL: all cores, no processes.
        for i, ids in enumerate(enc.encode_ordinary_batch(docs, num_threads=threads)):
            arr = np.empty(len(ids) + 1, dtype=np.uint16)
            arr[:-1] = ids
            arr[-1] = EOT
            writers["val" if is_val(f"{f.name}#{i}", settings.val_fraction) else "train"].add(arr)
        read += f.size
        bar.update(f.size)
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
