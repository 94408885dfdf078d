"""Raw-text sources for ``prepare``: the Python standard library (default, on every machine), or
.txt / .md / .jsonl / .parquet files (column ``text``) in a local or fsspec (``s3://``) directory or
glob. Files are listed in sorted order so everything downstream is deterministic."""

from __future__ import annotations

import glob
import io
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..core.errors import ConfigError
from ..integrations.storage import filesystem, is_remote, open_file

TEXT_EXTENSIONS = (".txt", ".md")
EXTENSIONS = TEXT_EXTENSIONS + (".jsonl", ".parquet")
STDLIB = "stdlib"


@dataclass(frozen=True)
class SourceFile:
    url: str  # local path or fsspec URL
    name: str  # path relative to the source root: the document id for the train/val split
    size: int
    version: str  # mtime or ETag: part of the fingerprint that makes re-runs no-ops


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(source: str) -> list[SourceFile]:
    """Every input file of ``source``, sorted; ConfigError if there is none."""
    if source == STDLIB:
        root = stdlib_root()
        paths = [p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)]
        files = [SourceFile(str(p), str(p.relative_to(root)), p.stat().st_size, str(p.stat().st_mtime_ns))
                 for p in paths]
    elif is_remote(source):
        fs, path = filesystem(source)
        try:
            if fs.isdir(path):
                found, root = fs.find(path, detail=True), path.rstrip("/")
            else:
                found, root = {p: fs.info(p) for p in fs.glob(path)}, os.path.dirname(path.split("*")[0].rstrip("/"))
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise ConfigError(f"data.source {source}: cannot list it ({type(e).__name__}: {e})") from e
        proto = source.split("://", 1)[0]
        files = [SourceFile(f"{proto}://{p}", os.path.relpath(p, root), int(info.get("size") or 0),
                            str(info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""))
                 for p, info in found.items() if p.endswith(EXTENSIONS)]
    else:
        p = Path(source).expanduser()
        if p.is_dir():
            candidates, root = [q for q in p.rglob("*") if q.is_file()], p
        else:
            candidates = [Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file()]
            root = Path(str(p).split("*")[0]).parent if "*" in str(p) else p.parent
        files = [SourceFile(str(q), str(q.relative_to(root)) if q.is_relative_to(root) else q.name,
                            q.stat().st_size, str(q.stat().st_mtime_ns))
                 for q in candidates if q.suffix in EXTENSIONS]
    if not files:
        raise ConfigError(f"data.source {source!r}: no input files ({', '.join(EXTENSIONS)}) found; "
                          "point it at a directory or glob of text, or use 'stdlib'")
    return sorted(files, key=lambda f: f.name)


TEXT_PIECE_BYTES = 64 << 20  # a longer text file is read in pieces, each ending at a blank line


def read_documents(f: SourceFile, piece_bytes: int = TEXT_PIECE_BYTES) -> Iterator[str]:
    """The documents of one file, streamed (memory stays bounded whatever the file's size): a whole text
    file (one longer than ``piece_bytes`` in pieces that end at blank lines), one jsonl line, or one
    parquet row."""
    with open_file(f.url, "rb") as fh:
        if f.url.endswith(".jsonl"):
            for n, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8", errors="replace")):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"data.source file {f.name} line {n + 1}: expected JSON with a 'text' field") from e
                if text:
                    yield text
        elif f.url.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(fh)
            if "text" not in pf.schema_arrow.names:
                raise ConfigError(f"data.source file {f.name}: parquet has no 'text' column (has {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["text"], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield text
        else:
            yield from _text_pieces(fh, piece_bytes)


def _text_pieces(fh, piece_bytes: int) -> Iterator[str]:
    carry = b""
    while True:
        chunk = fh.read(piece_bytes)
        if not chunk:
            break
        data = carry + chunk
        cut = data.rfind(b"\n\n", 0, len(data) - 1) if len(chunk) == piece_bytes else -1
        if cut < 0 and len(chunk) == piece_bytes and len(data) < 4 * piece_bytes:
            carry = data  # no blank line yet: read on (up to 4 pieces, then cut anyway)
            continue
        piece, carry = (data[: cut + 2], data[cut + 2 :]) if cut >= 0 else (data, b"")
        text = piece.decode("utf-8", errors="replace")
        if text.strip():
            yield text
    if carry:
        text = carry.decode("utf-8", errors="replace")
        if text.strip():
            yield text
