"""Raw-text sources for ``prepare``: the Python standard library (default, on every machine), or
.txt / .md / .jsonl / .parquet files (column ``text``) in a local or fsspec (``s3://``) directory or
glob. Files are listed in sorted order so everything downstream is deterministic."""

from __future__ import annotations

import glob
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


def _walk(root: str, suffixes: tuple[str, ...], skip: frozenset = frozenset()) -> list[SourceFile]:
    """Files under ``root`` with one of ``suffixes``, named relative to it; directories in ``skip`` are
    pruned, not walked. One stat per file (a corpus may hold millions)."""
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            if os.path.splitext(name)[1] in suffixes:
                path = os.path.join(top, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # a dangling link, or removed while listing
                    continue
                files.append(SourceFile(path, os.path.relpath(path, root), st.st_size, str(st.st_mtime_ns)))
    return files


def list_files(source: str) -> list[SourceFile]:
    """Every input file of ``source``, sorted; ConfigError if there is none."""
    if source == STDLIB:
        files = _walk(str(stdlib_root()), (".py",), frozenset({"site-packages", "dist-packages", "__pycache__"}))
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
            files = _walk(str(p), EXTENSIONS)
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
    yield from read_part(Part(f), piece_bytes)


@dataclass(frozen=True)
class Part:
    """A part of one file that can be read on its own: jsonl lines starting in bytes [start, stop),
    parquet row groups [start, stop); ``stop=None``: to the end. The parts of a file, read in order, give
    exactly the documents of the whole file, so engines may hand them to different processes."""

    file: SourceFile
    start: int = 0
    stop: int | None = None
    nbytes: int | None = None  # about how much of the file it is (progress, work units); None: all of it

    @property
    def size(self) -> int:
        return self.file.size if self.nbytes is None else self.nbytes


PART_BYTES = 8 << 20  # a jsonl or parquet file longer than this is split into parts of about this size


def parts(f: SourceFile, part_bytes: int = PART_BYTES) -> list[Part]:
    """``f`` as parts of about ``part_bytes`` (text files, and files under that size, are one part)."""
    if f.size <= part_bytes:
        return [Part(f)]
    if f.url.endswith(".jsonl"):
        bounds = list(range(0, f.size, part_bytes)) + [None]
        return [Part(f, a, b, (b or f.size) - a) for a, b in zip(bounds, bounds[1:])]
    if f.url.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with open_file(f.url, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"data.source file {f.name}: cannot read it as parquet ({type(e).__name__}: {e})") from e
        n, share = meta.num_row_groups, f.size // max(1, meta.num_row_groups)
        out, first, size = [], 0, 0
        for g in range(n):
            size += meta.row_group(g).total_byte_size
            if size >= part_bytes:
                out.append(Part(f, first, g + 1, share * (g + 1 - first)))
                first, size = g + 1, 0
        return out + ([Part(f, first, None, share * (n - first))] if first < n or not out else [])
    return [Part(f)]


def read_part(p: Part, piece_bytes: int = TEXT_PIECE_BYTES) -> Iterator[str]:
    """The documents of one part of a file, in file order."""
    f = p.file
    with open_file(f.url, "rb") as fh:
        if f.url.endswith(".jsonl"):
            yield from _jsonl(fh, f.name, p.start, p.stop)
        elif f.url.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(fh)
            if "text" not in pf.schema_arrow.names:
                raise ConfigError(f"data.source file {f.name}: parquet has no 'text' column (has {pf.schema_arrow.names})")
            groups = list(range(p.start, pf.metadata.num_row_groups if p.stop is None else p.stop))
            for batch in pf.iter_batches(columns=["text"], batch_size=1024, row_groups=groups):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield text
        else:
            yield from _text_pieces(fh, piece_bytes)


def _jsonl(fh, name: str, start: int, stop: int | None) -> Iterator[str]:
    """The ``text`` of every jsonl line that starts in bytes [start, stop). Lines end at ``\n``, ``\r\n``
    or ``\r`` (universal newlines); blank lines are skipped."""
    pos = 0 if start == 0 else _line_after(fh, start, stop)
    if pos is None:
        return  # no line starts in this part
    fh.seek(pos)
    while stop is None or pos < stop:
        raw = fh.readline()
        if not raw:
            break
        at, pos = pos, pos + len(raw)
        for line in raw.decode("utf-8", errors="replace").replace("\r\n", "\n").split("\r"):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"data.source file {name} at byte {at}: expected a JSON line with a 'text' "
                                  "field") from e
            if text:
                yield text


def _line_after(fh, start: int, stop: int | None, chunk: int = 1 << 16) -> int | None:
    """Where the first line starting at or after ``start`` begins (the line crossing ``start`` belongs to
    the part before), looked for in chunks up to ``stop``: a long line is skipped, never read whole."""
    pos = start - 1
    fh.seek(pos)
    while stop is None or pos < stop:
        data = fh.read(chunk)
        if not data:
            return None
        i = data.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(data)
    return None


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
