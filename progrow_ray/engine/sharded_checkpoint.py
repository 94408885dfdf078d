"""Sharded checkpoints (FSDP2): every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP),
and any world size, sharded or not, loads them — DCP reshards on load.

A sharded checkpoint is the usual directory (``checkpoint.py``) with format v2: the small files
(``state.json``, ``metrics.json``, ``rng.pt``, ``optimizer.json``) from rank 0 and ``shards/`` — DCP's
``.metadata`` and one ``__<rank>_0.distcp`` per rank, holding only tensors: the model's weights and the
optimizer's tensor state.
Everything else of the optimizer (its parameter groups, non-tensor state) is JSON, so nothing is unpickled
but DCP's own metadata, read through an unpickler that admits DCP's metadata classes and nothing else.
``manifest.json`` lists the sha256 of every file of every rank; rank 0 writes it last, after all ranks
have written theirs, so a directory without it is incomplete. On load the ranks split the files between
them to verify (each reads 1/N) and agree on the verdict before any rank reads a tensor.

Where the files go: a local directory directly (all ranks of a multi-node run need one shared file system
for a local ``out``; use ``s3://`` otherwise); an object store through a local staging directory per rank,
uploaded with retries; inside Ray Train each rank's directory is reported and Ray merges them into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from ..integrations import storage

FORMAT = "progrow_ray.checkpoint.v2"
SHARDS = "shards"


# ---- what a sharded checkpoint holds --------------------------------------------------------------


def sharded_state(model, optimizer) -> tuple[dict, dict]:
    """(tensors for DCP, JSON for the rest): this rank's shards of the model and optimizer state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    tensors: dict[str, dict] = {}
    scalars: dict[str, dict] = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors.setdefault(fqn, {})[key] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    extra = {"param_groups": osd["param_groups"], "scalars": scalars}
    return {"model": get_model_state_dict(model), "optimizer": tensors}, extra


def load_sharded_state(model, optimizer, reader, extra: dict) -> None:
    """Fill ``model`` and ``optimizer`` (sharded or not, any world size) from a checkpoint's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from .checkpoint import CheckpointError

    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer)  # every parameter's state exists (zeros), to fill
    metadata = reader.read_metadata()
    saved = set(metadata.state_dict_metadata)
    missing = [k for k in msd if f"model.{k}" not in saved]
    if missing:
        raise CheckpointError(f"checkpoint shards lack model weights {missing[:3]} (another model?)")
    tensors = {
        "model": msd,
        "optimizer": {
            fqn: {k: v for k, v in state.items() if torch.is_tensor(v) and f"optimizer.{fqn}.{k}" in saved}
            for fqn, state in osd["state"].items()
        },
    }
    dcp.load(tensors, storage_reader=reader, no_dist=not (dist.is_available() and dist.is_initialized()))
    set_model_state_dict(model, msd)
    state = {fqn: dict(s) for fqn, s in osd["state"].items()}
    for fqn, values in tensors["optimizer"].items():
        state[fqn].update(values)
    for fqn, values in extra["scalars"].items():
        state.setdefault(fqn, {}).update(values)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": extra["param_groups"]})


# ---- writing ----------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(obj: Any) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_local_shards(directory: str, tensors: dict) -> dict[str, str]:
    """DCP-save this rank's shards under ``directory/shards``; returns {relative name: sha256} of the files
    this rank wrote (rank 0 also writes DCP's ``.metadata``)."""
    import torch.distributed.checkpoint as dcp

    target = os.path.join(directory, SHARDS)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(target))
    rank = _rank()
    mine = [n for n in os.listdir(target) if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")]
    hashes = {}
    for n in sorted(mine):
        with open(os.path.join(target, n), "rb") as fh:
            hashes[f"{SHARDS}/{n}"] = storage.sha256_of(fh)
    return hashes


def encode_small(name: str, obj: Any) -> bytes:
    """A small file's bytes, encoded as whole-tensor checkpoints encode theirs."""
    from .checkpoint import _encode

    return _encode(name, obj)


def manifest_bytes(hashes: dict[str, str], world: int) -> bytes:
    return json.dumps({"format": FORMAT, "world_size": world, "files": hashes}, indent=1).encode()


def write_into(directory: str, small: dict[str, Any], tensors: dict) -> None:
    """Every rank: its shards into local ``directory`` (shared, or its own); rank 0 also the small files and,
    once every rank's hashes are in, the manifest."""
    os.makedirs(directory, exist_ok=True)
    hashes = write_local_shards(directory, tensors)
    if _rank() == 0:
        for name, obj in small.items():
            data = encode_small(name, obj)
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
    parts = _gather(hashes)
    if _rank() == 0:
        everyone = {k: v for part in parts for k, v in part.items()}
        with open(os.path.join(directory, "manifest.json"), "wb") as fh:
            fh.write(manifest_bytes(everyone, len(parts)))


def write_sharded_checkpoint(uri: str, small: dict[str, Any], tensors: dict) -> str:
    """All ranks: the checkpoint at ``uri`` (local directory or object store). The manifest comes last, after
    a barrier, so a reader never sees it before every rank's files."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(fs):
        if _rank() == 0 and os.path.exists(path):
            fs.rm(path, recursive=True)  # a rewrite of the same step: no stale files under a new manifest
        _barrier()
        write_into(path, small, tensors)
        _barrier()
        return uri
    with tempfile.TemporaryDirectory(prefix="progrow-ckpt-") as staging:
        hashes = write_local_shards(staging, tensors)
        for name in hashes:
            with open(os.path.join(staging, name), "rb") as fh:
                storage.write_bytes(f"{uri}/{name}", fh.read())  # retried (storage.with_retries)
        if _rank() == 0:
            for name, obj in small.items():
                data = encode_small(name, obj)
                storage.write_bytes(f"{uri}/{name}", data)
                hashes[name] = hashlib.sha256(data).hexdigest()
        parts = _gather(hashes)
        _barrier()
        if _rank() == 0:
            everyone = {k: v for part in parts for k, v in part.items()}
            storage.write_bytes(f"{uri}/manifest.json", manifest_bytes(everyone, len(parts)))
        _barrier()
    return uri


# ---- reading ----------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: admit its own metadata classes, torch's sizes and dtypes, paths
    and plain containers; refuse every other global (a tampered file cannot run code)."""

    BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes"}

    def find_class(self, module: str, name: str):
        from .checkpoint import CheckpointError

        obj = None
        if module.startswith("torch.distributed.checkpoint."):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            obj = obj if isinstance(obj, type) else None
        elif module == "torch":
            obj = getattr(torch, name, None)
            ok = name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
            obj = obj if ok else None
        elif module == "torch.serialization" and name == "_get_layout":
            obj = getattr(torch.serialization, name)
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            obj = getattr(__import__("pathlib"), name)
        elif module == "collections" and name == "OrderedDict":
            from collections import OrderedDict as obj
        elif module == "builtins" and name in self.BUILTINS:
            obj = getattr(__import__("builtins"), name)
        if obj is None:
            raise CheckpointError(f"checkpoint shards: .metadata refers to {module}.{name}; refused")
        return obj


def shard_reader(uri: str):
    """A DCP reader of ``uri``'s shards (local or any fsspec URL) whose metadata is read safely."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    fs, path = storage.filesystem(uri)
    local = storage.is_local(fs)
    base = FileSystemReader if local else FsspecReader

    class SafeReader(base):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            with fs.open(f"{path}/{SHARDS}/.metadata", "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(os.path.join(path, SHARDS) if local else f"{uri}/{SHARDS}")


def check_complete(manifest: dict) -> str | None:
    """A v2 manifest must list DCP's metadata and one shard file per rank that wrote it."""
    names = manifest.get("files", {})
    ranks = {n.split("/")[1].split("_")[2] for n in names if n.startswith(f"{SHARDS}/__")}
    if f"{SHARDS}/.metadata" not in names or len(ranks) != manifest.get("world_size"):
        return f"the manifest lists shards of {len(ranks)} of {manifest.get('world_size')} ranks"
    return None


def verify_files(uri: str, files: dict[str, str]) -> str | None:
    """Check the sha256 of ``files`` ({name: digest}) under ``uri``; the ranks of a process group split them
    (rank r takes every N-th) and share the verdict. Returns the first problem, or None."""
    fs, path = storage.filesystem(uri)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    problem = None
    for i, (name, digest) in enumerate(sorted(files.items())):
        if i % world != _rank():
            continue
        try:
            with fs.open(f"{path}/{name}", "rb") as fh:
                actual = storage.sha256_of(fh)
        except FileNotFoundError:
            problem = f"{name} is missing"
            break
        if actual != digest:
            problem = f"{name} does not match its sha256 (corrupted or partial)"
            break
    verdicts = [p for p in _gather(problem) if p]
    return verdicts[0] if verdicts else None
