"""The one storage layer: a local directory or ``s3://bucket/prefix``, for our own files and for Ray's.

Every other module reaches files through here (``filesystem``, ``open_file``, ``read_json`` ...); this
is the only module that imports fsspec or pyarrow.fs. Every write that can meet a transport error (an
object store restarting, a network blip) goes through ``with_retries``: JSON state, the standby
handoff, checkpoints, reports.

The S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), never from config files,
and are never logged. Imports fsspec only (pyarrow lazily, for Ray): the engine runs where Ray and
pyarrow are not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..core.errors import ConfigError

RETRY_DELAYS_S = (
    0.5,
    1,
    2,
    4,
    8,
    16,
)  # ~30 s of backoff: rides out an object store restart or a network blip
# Transport errors by class name, so that nothing here imports botocore or aiohttp to recognise them.
TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` of a local path or URL."""
    return fsspec.core.url_to_fs(uri)


def sha256_of(fh) -> str:
    """The sha256 hex digest of an open binary file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 24), b""):
        digest.update(block)
    return digest.hexdigest()


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_file(uri: str, mode: str = "rb"):
    return fsspec.open(uri, mode)


# ---- retries --------------------------------------------------------------------------------------
def is_transient(e: BaseException) -> bool:
    if isinstance(
        e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    ):
        return False
    return isinstance(e, (ConnectionError, TimeoutError, OSError)) or any(
        c.__name__ in TRANSIENT_NAMES for c in type(e).__mro__
    )


def with_retries(op: Callable[[], Any], what: str, delays=RETRY_DELAYS_S, log: Callable[[str], None] = print):
    """Run ``op``; on a transport error retry with exponential backoff, then give up with the last error."""
    for delay in (*delays, None):
        try:
            return op()
        except Exception as e:  # noqa: BLE001 - only transport errors are retried, see is_transient
            if delay is None or not is_transient(e):
                raise
            log(f"warning: {what} failed ({type(e).__name__}); retrying in {delay:g} s")
            time.sleep(delay)


# ---- whole objects ---------------------------------------------------------------------------------
def write_bytes(uri: str, data: bytes, log: Callable[[str], None] = print) -> None:
    """Write one object whole, with retries: a temporary file and an atomic rename locally (a reader never
    sees half a file), a single PUT on an object store."""
    fs, path = filesystem(uri)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open(path, "wb") as fh:
            fh.write(data)

    with_retries(put, f"write {uri}", log=log)


def read_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    fs, path = filesystem(uri)

    def get() -> bytes | None:
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    return with_retries(get, f"read {uri}")


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, default=str).encode())


def read_json(uri: str):
    data = read_bytes(uri)
    return None if data is None else json.loads(data)


def list_dirs(uri: str, prefix: str = "") -> list[str]:
    """URIs of the sub-directories of ``uri`` whose names start with ``prefix``, sorted by name."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
    return [join(uri, n) for n in names if n.startswith(prefix)]


# ---- Ray ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train / Tune keep a run's results and checkpoints: Ray wants a path plus a pyarrow
    filesystem (None: local). ``uri(path)`` turns a path Ray returns back into one of our URIs."""

    uri: str

    @property
    def path(self) -> str:
        return self.uri[len("s3://") :].rstrip("/") if is_s3(self.uri) else os.path.abspath(self.uri)

    @property
    def filesystem(self):
        if not is_s3(self.uri):
            return None
        import pyarrow.fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pyarrow.fs.S3FileSystem(**kwargs)

    def uri_of(self, path: str) -> str:
        return path if "://" in path or not is_s3(self.uri) else f"s3://{path}"

    def child(self, name: str) -> str:
        """The URI of ``name`` below the storage root (a fit's directory, a handoff file)."""
        return join(self.uri if is_s3(self.uri) else self.path, name)


# ---- fail fast ------------------------------------------------------------------------------------
def check_endpoint(timeout_s: float = 5.0) -> None:
    """s3fs reports an unreachable endpoint as a missing bucket; look for a listener first."""
    import socket

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        endpoint = f"https://s3.{region}.amazonaws.com"
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"S3 endpoint {endpoint} is not reachable ({type(e).__name__}): run storage is not "
            "reachable; check the endpoint and credentials in the environment"
        ) from None


def check_writable(uri: str) -> None:
    """Fail fast, before any training, when the run storage cannot be reached or written."""
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}/.progrow_ray_write_check"
    try:
        if is_s3(uri):
            check_endpoint()
            bucket = path.split("/", 1)[0]
            if not fs.exists(bucket):
                raise ConfigError(
                    f"out {uri}: S3 bucket {bucket!r} does not exist (or is not visible with these "
                    "credentials); create it or point `out` elsewhere"
                )
        else:
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport error means "not reachable"
        where = (
            f" (endpoint {os.environ['AWS_ENDPOINT_URL']})"
            if is_s3(uri) and os.environ.get("AWS_ENDPOINT_URL")
            else ""
        )
        raise ConfigError(
            f"out {uri}: run storage is not reachable{where}: {type(e).__name__}; check the "
            "endpoint and credentials in the environment"
        ) from None
