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


def read_documents(f: SourceFile) -> Iterator[str]:
    """The documents of one file: a whole text file, one jsonl line, or one parquet row."""
    with open_file(f.url, "rb") as fh:
        raw = fh.read()
    if f.url.endswith(".jsonl"):
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
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

        table = pq.read_table(io.BytesIO(raw))
        if "text" not in table.column_names:
            raise ConfigError(f"data.source file {f.name}: parquet has no 'text' column (has {table.column_names})")
        for text in table.column("text").to_pylist():
            if text:
                yield text
    else:
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            yield text
