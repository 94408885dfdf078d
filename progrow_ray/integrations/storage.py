"""Run storage for Ray and our own files: a local directory or ``s3://bucket/prefix``.

The S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), never from config files,
and are never logged.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import fsspec
import pyarrow.fs

from ..core.errors import ConfigError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def pyarrow_s3() -> pyarrow.fs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pyarrow.fs.S3FileSystem(**kwargs)


def ray_storage(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's RunConfig."""
    if is_s3(uri):
        return uri[len("s3://"):].rstrip("/"), pyarrow_s3()
    return os.path.abspath(uri), None


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
        raise ConfigError(f"S3 endpoint {endpoint} is not reachable ({type(e).__name__}): run storage is not "
                          "reachable; check the endpoint and credentials in the environment") from None


def check_writable(uri: str) -> None:
    """Fail fast, before any training, when the run storage cannot be reached or written."""
    fs, path = fsspec.core.url_to_fs(uri)
    probe = f"{path.rstrip('/')}/.progrow_ray_write_check"
    try:
        if is_s3(uri):
            check_endpoint()
            bucket = path.split("/", 1)[0]
            if not fs.exists(bucket):
                raise ConfigError(f"out {uri}: S3 bucket {bucket!r} does not exist (or is not visible with these "
                                  "credentials); create it or point `out` elsewhere")
        else:
            fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport error means "not reachable"
        where = f" (endpoint {os.environ['AWS_ENDPOINT_URL']})" if is_s3(uri) and os.environ.get("AWS_ENDPOINT_URL") else ""
        raise ConfigError(f"out {uri}: run storage is not reachable{where}: {type(e).__name__}; check the "
                          "endpoint and credentials in the environment") from None


def read_json(uri: str):
    import json

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def write_json(uri: str, obj) -> None:
    import json

    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(json.dumps(obj, indent=2, default=str).encode())


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)
