"""Reading configs: strict YAML loading into the typed sections, ``--set key=value`` overrides, and
the plain-dict form that checkpoints, state files and MLflow params hold. Unknown keys and wrong types
are ``ConfigError``s naming the key; the values themselves are checked by ``checks.py``."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ...core.errors import ConfigError, require
from .schema import RunConfig

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
C = TypeVar("C")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        require(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        require(len(value) == len(args), f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_check_type(v, a, key) for v, a in zip(value, args))
    if tp is list:
        require(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        return list(value)
    if tp is dict:
        require(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, str) and tp in (int, float) and SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e6 (no dot) as a string; users mean the number
        if tp is int and value.is_integer():
            value = int(value)
    if tp is int:
        require(
            isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}"
        )
        return value
    if tp is float:
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{key} must be a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        require(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    require(isinstance(data, dict), f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known under "
            f"{prefix.rstrip('.') or 'top level'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    out = dataclasses.asdict(cfg)

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(out)


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.total_tokens=1e6", "model.n_layer=2"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        require("=" in pair, f"--set takes key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if isinstance(value, float) and value.is_integer() and ("e" in raw.lower()):
            value = int(value)  # 1e6 tokens -> 1000000
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            require(isinstance(node, dict), f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    require(p.is_file(), f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    require(isinstance(data, dict), f"--config {path}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[C] = RunConfig) -> C:
    """Preset ``path`` (None: the defaults) with ``overrides``, as ``cls``: types checked, values not yet."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, deep_merge(data, parse_overrides(overrides or [])))


def load_run_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type[C] = RunConfig,
    world_size: int = 1,
) -> C:
    """``load_config``, then every check of ``cls.validate`` (at ``world_size`` workers)."""
    return load_config(path, overrides, cls).validate(world_size=world_size)
