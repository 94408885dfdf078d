"""A node-local copy of remote token shards that every process on the node shares safely.

Every rank of a node (and every τ-search probe on it) opens the same shards. One process downloads them,
under an exclusive ``flock`` on the dataset's lock file; each file goes to a temporary name of its own,
is checked against its sha256 in ``meta.json`` and renamed into place (atomic). The last step writes a
marker naming the dataset's fingerprint: later processes that find it skip both the download and the
hashing — the shards are verified once per node, not once per rank. A process reading the cache keeps a
shared lock on it for as long as it has the shards open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Callable

from ..core.errors import ConfigError
from ..integrations.storage import filesystem, sha256_of

MARKER = ".verified"


class CorruptDataError(ConfigError):
    """A shard does not match meta.json."""


def default_cache_dir() -> str:
    return os.environ.get("PROGROW_CACHE", str(Path.home() / ".cache" / "progrow_ray"))


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return sha256_of(fh)


def _shards(meta: dict) -> list[dict]:
    return [s for split in meta["splits"].values() for s in split["shards"]]


def _marker_text(meta: dict) -> str:
    return json.dumps({"fingerprint": meta["fingerprint"], "shards": [s["sha256"] for s in _shards(meta)]})


def _key(uri: str, meta: dict) -> str:
    return hashlib.sha256(f"{uri}\0{meta['fingerprint']}".encode()).hexdigest()[:16]


# ---- local shards: verified once per node and file version -----------------------------------------
def _local_stamp(root: str, meta: dict) -> str:
    files = []
    for s in _shards(meta):
        st = os.stat(os.path.join(root, s["file"]))
        files.append([s["file"], s["sha256"], st.st_size, st.st_mtime_ns])
    return json.dumps({"fingerprint": meta["fingerprint"], "files": files})


def local_verified(root: str, meta: dict, cache_dir: str | None = None) -> bool:
    """Whether this node already hashed these local shards, unchanged since (size and mtime)."""
    try:
        stamp = _local_stamp(root, meta)
    except FileNotFoundError:
        return False
    return _read(Path(cache_dir or default_cache_dir()) / "verified" / _key(root, meta)) == stamp


def mark_local_verified(root: str, meta: dict, cache_dir: str | None = None) -> None:
    where = Path(cache_dir or default_cache_dir()) / "verified"
    try:
        where.mkdir(parents=True, exist_ok=True)
        _write_whole(where / _key(root, meta), _local_stamp(root, meta))
    except OSError:
        pass  # no writable cache: every open verifies, as before


class CacheLease:
    """The local directory of a dataset's shards, pinned (a shared lock) until ``close``."""

    def __init__(self, path: str, fd: int | None, downloaded: int):
        self.path, self._fd, self.downloaded = path, fd, downloaded
        self.verified = fd is not None  # the node marker vouches for every shard

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the shared lock
            self._fd = None

    def __del__(self):
        self.close()


def cached_shards(
    uri: str,
    meta: dict,
    cache_dir: str | None = None,
    max_gb: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> CacheLease:
    """The shards of ``uri`` (remote) in this node's cache: downloaded and verified by one process, reused
    by every other; the returned lease holds a shared lock on them. With ``max_gb`` the cache is kept
    under that size by removing the least recently used datasets no process has open."""
    fs, root = filesystem(uri)
    base = Path(cache_dir or default_cache_dir())
    key = _key(uri, meta)
    local = base / key
    local.mkdir(parents=True, exist_ok=True)
    marker, expected = local / MARKER, _marker_text(meta)
    fd = os.open(base / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process downloads
        if _read(marker) == expected:
            os.utime(marker)  # recently used: evicted last
            return CacheLease(str(local), fd, 0)
        fcntl.flock(fd, fcntl.LOCK_EX)  # one downloader per node; the others wait on their shared lock
        downloaded = 0
        if _read(marker) != expected:  # nobody finished it while this process waited
            if max_gb is not None:
                _make_room(base, key, _bytes(meta), int(max_gb * 1e9), log)
            downloaded = _download(fs, root, local, meta, log)
            _write_whole(marker, expected)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return CacheLease(str(local), fd, downloaded)
    except BaseException:
        os.close(fd)
        raise


def _bytes(meta: dict) -> int:
    return sum(2 * s["tokens"] + 128 for s in _shards(meta))  # uint16 tokens + the .npy header


def _dir_bytes(path: Path) -> int:
    return sum(size for _, size, _ in _sizes(path, hidden=True))


def _make_room(base: Path, keep: str, need: int, limit: int, log) -> None:
    """Remove whole cached datasets, least recently used first, that no process holds open, until ``need``
    more bytes fit under ``limit``; a dataset larger than the limit by itself is refused."""
    if need > limit:
        raise ConfigError(
            f"data.cache_max_gb={limit / 1e9:g} cannot hold this dataset's {need / 1e9:.2f} GB of shards; "
            "raise it, or stream the shards with data.block_shards (a corpus larger than the node's disk)"
        )
    others = [d for d in base.iterdir() if d.is_dir() and d.name not in (keep, "verified")]
    used = sum(_dir_bytes(d) for d in others) + (_dir_bytes(base / keep) if (base / keep).is_dir() else 0)
    for d in sorted(others, key=lambda d: (d / MARKER).stat().st_mtime if (d / MARKER).exists() else 0):
        if used + need <= limit:
            return
        with _unused(base / f"{d.name}.lock") as free:
            if not free:
                continue
            size = _dir_bytes(d)
            shutil.rmtree(d)
            used -= size
            log(f"data: cache over data.cache_max_gb, removed {d.name} ({size / 1e9:.2f} GB, unused)")
    if used + need > limit:
        raise ConfigError(
            f"data.cache_max_gb={limit / 1e9:g}: {used / 1e9:.2f} GB of cached shards are in use by other "
            f"processes on this node and this dataset needs {need / 1e9:.2f} GB more; raise it"
        )


@contextlib.contextmanager
def _unused(lock: Path):
    """Whether no process holds ``lock`` (shared or exclusive), found without waiting; while it is True
    this process holds it exclusively, so nobody starts using what it guards."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _write_whole(path: Path, text: str) -> None:
    """``text`` at ``path``, whole or not at all: a temporary name of this process, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _download(fs, root: str, local: Path, meta: dict, log) -> int:
    """Every shard not already present with the right sha256: to a temporary name of this process,
    checked, renamed into place. Returns how many were downloaded."""
    n = 0
    for shard in _shards(meta):
        target = local / shard["file"]
        if target.exists() and file_sha256(str(target)) == shard["sha256"]:
            continue
        _download_one(fs, root, local, shard)
        n += 1
    if n:
        log(f"data: {n} shard(s) downloaded to {local}")
    return n


# ---- streamed shards: a corpus larger than the node's disk ------------------------------------------
class StreamedShards:
    """Remote shards fetched into this node's cache one at a time, as the sampler reaches them, and
    removed least recently used first when the cache would outgrow ``max_gb`` (``data.block_shards``).

    A process reading a shard holds a shared lock on its pin file, so no process on the node removes it
    (removal takes the exclusive lock without waiting). A process that finds it missing downloads it,
    one download at a time per node (a temporary name of its own, sha256 checked, renamed into place: a
    file under its final name is verified). The bound holds the shards every process of the node
    has pinned: ranks read in step, so that is about one process's share."""

    def __init__(self, uri: str, meta: dict, cache_dir: str | None, max_gb: float):
        self.fs, self.root = filesystem(uri)
        base, name = Path(cache_dir or default_cache_dir()), f"{_key(uri, meta)}-streamed"
        self.local = base / name
        self.limit = int(max_gb * 1e9)
        self.downloaded = 0  # by this process
        # held shared while open (taken before the directory is made): the whole-dataset eviction of
        # other runs leaves the directory alone
        base.mkdir(parents=True, exist_ok=True)
        self._lease = os.open(base / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lease, fcntl.LOCK_SH)
        self.local.mkdir(exist_ok=True)

    def close(self) -> None:
        if getattr(self, "_lease", None) is not None:
            os.close(self._lease)
            self._lease = None

    def __del__(self):
        self.close()

    def open(self, shard: dict) -> tuple[str, int]:
        """(local path, lock fd) of ``shard``, present and pinned until ``os.close(fd)``."""
        target = self.local / shard["file"]
        pin = os.open(self.local / f".{shard['file']}.pin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                fcntl.flock(pin, fcntl.LOCK_SH)
                if target.exists():
                    os.utime(target)  # recently used: removed last
                    return str(target), pin
                fcntl.flock(pin, fcntl.LOCK_UN)
                self._fetch(shard, target)
        except BaseException:
            os.close(pin)
            raise

    def _fetch(self, shard: dict, target: Path, patience_s: float = 120.0) -> None:
        # One download at a time per node and dataset, under a lock of its own (never a pin: a process
        # waiting to download must not wait on readers, who may be waiting on it): the room one makes is
        # still free when its shard lands, so the bound holds. With no room (every shard pinned), wait for
        # readers to move on, without the lock, then give up with one line.
        deadline, delay = time.monotonic() + patience_s, 0.05
        while True:
            fetching = os.open(self.local / ".fetching", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fetching, fcntl.LOCK_EX)
                if target.exists():  # fetched while this process waited
                    return
                for orphan in self.local.glob(".*.part"):  # only the lock's holder downloads: left by a crash
                    orphan.unlink(missing_ok=True)
                if self._make_room(2 * shard["tokens"] + 128, final=time.monotonic() > deadline):
                    _download_one(self.fs, self.root, self.local, shard)
                    self.downloaded += 1
                    return
            finally:
                os.close(fetching)
            time.sleep(delay)
            delay = min(1.0, 2 * delay)

    def _make_room(self, need: int, final: bool) -> bool:
        """Remove unpinned shards, least recently used first, until ``need`` more bytes fit under the bound;
        False if they do not (every shard left is pinned), or, when ``final``, a ConfigError."""
        files = _sizes(self.local)
        used = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):  # least recently used first
            if used + need <= self.limit:
                return True
            with _unused(self.local / f".{p.name}.pin") as free:
                if not free:
                    continue
                p.unlink(missing_ok=True)  # (another process may have just removed it)
                used -= size
        if used + need <= self.limit:
            return True
        if final:
            raise ConfigError(
                f"data.cache_max_gb={self.limit / 1e9:g}: the shards pinned on this node ({used / 1e9:.3g} GB) "
                f"leave no room for the next ({need / 1e9:.3g} GB) after waiting; raise it or lower "
                "data.block_shards (readers not in step, such as τ-search probes, each pin their own blocks)"
            )
        return False


def _sizes(local: Path, hidden: bool = False) -> list[tuple[float, int, Path]]:
    """(last use, size, path) of the shards in ``local`` (with ``hidden``: every file); other processes
    add and remove them meanwhile."""
    out = []
    try:
        entries = list(local.iterdir())
    except FileNotFoundError:
        return out
    for p in entries:
        if hidden or not p.name.startswith("."):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                out.append((st.st_mtime, st.st_size, p))
    return out


def _download_one(fs, root: str, local: Path, shard: dict) -> None:
    """``shard`` into ``local``: to a temporary name of this process, checked, renamed into place."""
    tmp = local / f".{shard['file']}.{os.getpid()}.{uuid.uuid4().hex}.part"
    try:
        fs.get(f"{root.rstrip('/')}/{shard['file']}", str(tmp))
        if file_sha256(str(tmp)) != shard["sha256"]:
            raise CorruptDataError(
                f"shard {shard['file']} downloaded from {root} does not match its sha256 in meta.json "
                "(corrupted or being rewritten); re-run prepare"
            )
        os.replace(tmp, local / shard["file"])
    finally:
        if tmp.exists():
            tmp.unlink()
