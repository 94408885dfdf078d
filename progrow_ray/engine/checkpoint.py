"""Checkpoints: a directory of files plus ``manifest.json`` (sha256 of each), local or any fsspec URL.

Writing is atomic: locally the directory is built under a temporary name and renamed into place;
on object stores (no rename) the manifest is written last, so a directory without a valid manifest
is incomplete by definition. Loading verifies every sha256 and uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from typing import Any, Callable

import torch

from ..core.errors import ConfigError
from ..integrations import storage
from . import sharded_checkpoint

MANIFEST = "manifest.json"
SHARDS = "shards"  # files["shards"]: tensors to write sharded (FSDP), or the URI of a sharded checkpoint read
FORMAT = "progrow_ray.checkpoint.v1"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, partial or corrupted."""


def _encode(name: str, obj: Any) -> bytes:
    if name.endswith(".json"):
        return json.dumps(obj, indent=1, sort_keys=True).encode()
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _decode(name: str, data: bytes) -> Any:
    if name.endswith(".json"):
        return json.loads(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_checkpoint(uri: str, files: dict[str, Any]) -> str:
    """Write ``{"model.pt": state_dict, "state.json": {...}, ...}`` to directory ``uri``. Remote
    writes are retried with backoff; the manifest, written last, marks the directory complete."""
    fs, path = storage.filesystem(uri)
    blobs = {name: _encode(name, obj) for name, obj in files.items()}
    manifest = {"format": FORMAT, "files": {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}}
    local = storage.is_local(fs)
    staging = uri  # remotely in place; locally under a temporary name, renamed into place at the end
    if local:
        staging = os.path.join(
            os.path.dirname(path.rstrip("/")), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
        )
    for name, data in [*blobs.items(), (MANIFEST, json.dumps(manifest, indent=1).encode())]:
        storage.write_bytes(f"{staging}/{name}", data)  # remote writes retry (storage.with_retries)
    if local:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    return uri


def read_checkpoint(uri: str, names: list[str] | None = None) -> dict[str, Any]:
    """Verify the manifest and load the files (all, or ``names``)."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(f"{path}/{MANIFEST}", "rb") as fh:
            manifest = json.loads(fh.read())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {uri} is incomplete: no {MANIFEST}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {uri}: {MANIFEST} is corrupted") from e
    if manifest.get("format") == sharded_checkpoint.FORMAT:
        return _read_sharded(uri, manifest, names)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {uri}: unknown format {manifest.get('format')!r}")
    out = {}
    for name, digest in manifest["files"].items():
        if names is not None and name not in names:
            continue
        try:
            with fs.open(f"{path}/{name}", "rb") as fh:
                data = fh.read()
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {uri}: {name} is missing") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(
                f"checkpoint {uri}: {name} does not match its sha256 (corrupted or partial)"
            )
        out[name] = _decode(name, data)
    return out


def _read_sharded(uri: str, manifest: dict, names: list[str] | None) -> dict[str, Any]:
    """A sharded (v2) checkpoint: every file verified (the ranks of a group split them), the small files
    loaded, and ``files["shards"]`` = ``uri``, for ``sharded_checkpoint.load_sharded_state``."""
    problem = sharded_checkpoint.check_complete(manifest) or sharded_checkpoint.verify_files(
        uri, manifest["files"]
    )
    if problem:
        raise CheckpointError(f"checkpoint {uri}: {problem}")
    fs, path = storage.filesystem(uri)
    out: dict[str, Any] = {SHARDS: uri}
    for name in manifest["files"]:
        if name.startswith(f"{sharded_checkpoint.SHARDS}/") or (names is not None and name not in names):
            continue
        with fs.open(f"{path}/{name}", "rb") as fh:
            out[name] = _decode(name, fh.read())
    return out


class CheckpointManager:
    """``root/step_00000123/`` directories; keeps the newest ``keep`` and finds the newest valid one."""

    def __init__(self, root: str, keep: int = 2, log: Callable[[str], None] = print):
        self.root, self.keep, self.log = root.rstrip("/"), keep, log
        self.fs, self.path = storage.filesystem(self.root)

    def _steps(self) -> list[int]:
        try:
            names = [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted((int(m.group(1)) for n in names if (m := STEP_DIR.match(n))), reverse=True)

    def uri(self, step: int) -> str:
        return f"{self.root}/step_{step:08d}"

    def save(self, step: int, files: dict[str, Any]) -> str:
        """Rank 0 alone for whole-tensor files; every rank for sharded ones (``files["shards"]``)."""
        if SHARDS in files:
            small = {k: v for k, v in files.items() if k != SHARDS}
            uri = sharded_checkpoint.write_sharded_checkpoint(self.uri(step), small, files[SHARDS])
            if sharded_checkpoint._rank() != 0:
                return uri
        else:
            uri = write_checkpoint(self.uri(step), files)
        for old in self._steps()[self.keep :]:
            self.fs.rm(f"{self.path}/step_{old:08d}", recursive=True)
        return uri

    def load_latest(self) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that verifies, loaded; corrupted or partial newer ones are skipped
        (with a warning)."""
        for step in self._steps():
            uri = self.uri(step)
            try:
                return uri, read_checkpoint(uri)
            except CheckpointError as e:
                self.log(f"warning: skipping {e}")
        return None
