"""The mixing-time registry: every t_mix the τ search measured, keyed by what it depends on.

t_mix is robust to model size (paper App. C.1), counted in tokens (App. C.3) and, in WSD's stable phase,
barely depends on τ (Takeaway 6): once measured it can be reused by any run that trains the same family
at the same depth pair with the same optimizer, learning rate, schedule shape, batch and data. The
fingerprint holds exactly those; the width is recorded beside it, not matched, and a value measured on a
narrower model than the one that reuses it is reported as transferred.

One JSON file per fingerprint, ``<registry>/<key>.json`` (local directory or ``s3://``), holding the
measurements made for it, newest last, and what main runs later found (the predicted and the measured
final loss gap). ``python -m progrow_ray.tmix list|show|add|forget`` reads and edits it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass

from ..core.errors import require
from ..core.models import model_config_class
from ..integrations.storage import filesystem, join, read_json, write_json
from .search_plan import Prior

VERSION = 1


def registry_uri(cfg) -> str:
    return cfg.tune.registry or join(cfg.out, "tmix-registry")


def data_id(data) -> dict:
    """The tokenizer and what identifies the corpus: the prepared shards' fingerprint (their sources'
    names, sizes and versions, and the prepare settings). The data must be prepared first."""
    from ..data.images import SYNTHETIC_IMAGES
    from ..data.prepare import read_meta

    if data.source == SYNTHETIC_IMAGES:
        return {"tokenizer": "images", "data": f"{SYNTHETIC_IMAGES}:{data.image_size}:{data.image_noise}"}
    meta = read_meta(data.uri)
    require(
        meta is not None and "fingerprint" in meta,
        f"data.uri {data.uri}: not prepared, so the mixing-time registry cannot tell which corpus it is; "
        f"prepare it first (`python -m progrow_ray.data prepare --source {data.source} --out {data.uri}`)",
    )
    return {"tokenizer": meta["tokenizer"]["name"], "data": meta["fingerprint"][:16]}


def fingerprint(cfg) -> dict:
    """What t_mix depends on, for the probes ``cfg`` (a ``PipelineConfig``, as configured) would run: their
    depth pair (``tune.probe_model`` may set the target depth), not their width; the optimizer with its
    configured learning rate (and the LR search's settings, which decide the one the probes use); and
    what "mixed" means (tolerance, window, smoothing, depth advantage)."""
    probe = cfg.run_config()
    probe = dataclasses.replace(probe, model={**probe.model, **cfg.tune.probe_model})
    target = probe.target_model_config()
    source = cfg.growth.source_depth
    t = cfg.tune
    fp = {
        "version": VERSION,
        "family": cfg.model_kind,
        "depths": [list(source) if isinstance(source, (list, tuple)) else source, _plain(target.depth)],
        "method": cfg.growth.method,
        "optimizer": _plain(dataclasses.asdict(cfg.optimizer)),
        "lr_search": _plain(dataclasses.asdict(t.lr_search)) if t.lr_search.enabled else None,
        "schedule": _plain(dataclasses.asdict(cfg.schedule)),
        "batch_tokens": cfg.train.batch_tokens,
        "mixed": {
            "rel_tol": t.rel_tol,
            "window_frac": t.window_frac,
            "smoothing": t.smoothing,
            "min_depth_advantage": t.min_depth_advantage,
        },
        "unit": model_config_class(cfg.model_kind).unit,
        **data_id(cfg.data),
    }
    if fp["unit"] == "token":
        fp["seq_len"] = cfg.data.seq_len
    return fp


def _plain(x):
    return json.loads(json.dumps(x, default=list))


def _is_key(name: str) -> bool:
    return len(name) == 12 and all(c in "0123456789abcdef" for c in name)


def key_of(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Hit:
    """A registry measurement a run can use: the entry's key, the measurement, and how it transfers."""

    key: str
    measurement: dict
    target_width: int

    @property
    def t_mix_tokens(self) -> int:
        return int(self.measurement["t_mix_tokens"])

    @property
    def transferred(self) -> bool:
        return self.measurement.get("probe_width") != self.target_width

    def describe(self) -> str:
        m = self.measurement
        how = (
            f"measured at {m.get('width_field', 'width')}={m.get('probe_width')}, transferred to "
            f"{self.target_width}"
            if self.transferred
            else f"measured at the target width {self.target_width}"
        )
        return f"registry {self.key}/{m['id']}: {m['source']} by {m.get('run')!r} on {m['time'][:10]}, {how}"

    def prior(self) -> Prior:
        return Prior(self.t_mix_tokens, self.describe())

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "measurement": self.measurement["id"],
            "t_mix_tokens": self.t_mix_tokens,
            "reused": True,
            "transferred": self.transferred,
            "source": self.describe(),
        }


class Registry:
    def __init__(self, uri: str):
        self.uri = uri

    def _file(self, key: str) -> str:
        require(len(key) == 12 and all(c in "0123456789abcdef" for c in key), f"not a registry key: {key!r}")
        return join(self.uri, f"{key}.json")

    def entries(self) -> list[dict]:
        fs, path = filesystem(self.uri)
        try:
            names = sorted(os.path.basename(n) for n in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        keys = [n[:-5] for n in names if n.endswith(".json") and _is_key(n[:-5])]  # other files are not ours
        return [e for k in keys if (e := self.get(k)) is not None]

    def get(self, key: str) -> dict | None:
        return read_json(self._file(key))

    def lookup(self, fp: dict, target_width: int) -> Hit | None:
        """The newest measurement that mixed, for exactly this fingerprint."""
        key = key_of(fp)
        entry = self.get(key)
        mixed = [m for m in (entry or {}).get("measurements", []) if m.get("t_mix_tokens") is not None]
        return Hit(key, mixed[-1], target_width) if mixed else None

    def record(self, fp: dict, **measurement) -> tuple[str, str]:
        """Add a measurement (``t_mix_tokens`` None: it did not mix within ``cap_tokens``); returns (key,
        measurement id)."""
        key = key_of(fp)
        entry = self.get(key) or {"key": key, "fingerprint": fp, "measurements": []}
        mid = uuid.uuid4().hex[:8]
        entry["measurements"].append(
            {
                "id": mid,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "outcomes": [],
                **measurement,
            }
        )
        write_json(self._file(key), entry)
        return key, mid

    def record_outcome(self, key: str, measurement_id: str, outcome: dict) -> bool:
        """What a main run that used this measurement found (its predicted and measured loss gap)."""
        entry = self.get(key)
        for m in (entry or {}).get("measurements", []):
            if m["id"] == measurement_id:
                m.setdefault("outcomes", []).append(outcome)
                write_json(self._file(key), entry)
                return True
        return False

    def forget(self, key: str, measurement_id: str | None = None) -> int:
        """Remove an entry (or one of its measurements); returns how many measurements went."""
        entry = self.get(key)
        if entry is None:
            return 0
        fs, path = filesystem(self._file(key))
        if measurement_id is None:
            fs.rm(path)
            return len(entry["measurements"])
        keep = [m for m in entry["measurements"] if m["id"] != measurement_id]
        gone = len(entry["measurements"]) - len(keep)
        if gone:
            if keep:
                write_json(self._file(key), {**entry, "measurements": keep})
            else:
                fs.rm(path)
        return gone
