"""One reproduction trial, pure torch (no Ray, no MLflow): it runs wherever the engine runs, inside a
Ray Tune trial or in-process on a GPU machine without Ray.

A trial is a ``TrialSpec``: a training run (any model the engine trains: GPT, MoE, ResNet on images)
or a spectral measurement of freshly expanded weights. The result is a plain dict — it goes to
results.json as it is — with the curve (train loss by tokens; images for ResNet), final val loss and FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..engine.config import RunConfig


@dataclass(frozen=True)
class SpectralProbe:
    """Expand a freshly initialised ``model`` from ``source_depth`` to ``target_depth`` with ``method``."""

    model: dict  # model fields (kind included)
    source_depth: int
    target_depth: int
    method: str
    seed: int = 0


@dataclass(frozen=True)
class TrialSpec:
    id: str
    run: RunConfig | None = None  # a training trial ...
    spectral: SpectralProbe | None = None  # ... or a measurement
    meta: dict = field(default_factory=dict)  # what the experiment varies (tags, table columns)

    def __post_init__(self) -> None:
        if (self.run is None) == (self.spectral is None):
            raise ValueError(f"trial {self.id!r}: give exactly one of run and spectral")

    @property
    def kind(self) -> str:
        return "spectral" if self.spectral is not None else self.run.target_model_config().unit + "s"

    def with_data_uri(self, uri: str) -> "TrialSpec":
        """Token runs read ``uri`` (shards prepared once for the experiment); others are unchanged."""
        if self.kind != "tokens":
            return self
        return replace(self, run=replace(self.run, data=replace(self.run.data, uri=uri)))


def run_trial(spec: TrialSpec, threads: int = 1, device: str | None = None) -> dict:
    torch.set_num_threads(max(1, threads))
    started = time.time()
    if spec.spectral is not None:
        out = _spectral(spec.spectral)
        out["flops_paper"] = 0.0
    else:
        out = _train(spec.run, device)
        out["flops_paper"] = paper_flops(spec, out)
    return {"id": spec.id, "meta": spec.meta, "wall_s": time.time() - started, **out}


def paper_flops(spec: TrialSpec, result: dict) -> float:
    """The trial's FLOPs as the paper's eq. 1.1 counts them (6 x non-embedding parameters per token),
    from its config and where it expanded; a ResNet's count is the same either way."""
    if spec.kind != "tokens":
        return result["flops"]
    return spec.run.run_flops("paper", tau_tokens=result["expansions"][-1] if result["expansions"] else None)


def _curve(history: list[dict]) -> dict:
    train = [e for e in history if e["event"] == "train"]
    evals = [e for e in history if e["event"] == "eval"]
    return {
        "curve": [[e["tokens"], e["train_loss"], e["flops"]] for e in train],
        "evals": [[e["tokens"], e["val_loss"], e["flops"]] for e in evals],
        "expansions": [e["tokens"] for e in history if e["event"] == "expand"],
    }


def _train(run: RunConfig, device: str | None) -> dict:
    from ..engine.trainer import Trainer

    if device:
        run = replace(run, train=replace(run.train, device=device))
    trainer = Trainer(run, save_checkpoint=lambda *_: None, log=lambda _: None)
    result = trainer.run()
    out = {
        "val_loss": result.val_loss,
        "flops": result.flops,
        "tokens": result.tokens,
        **_curve(trainer.history),
    }
    if result.val_accuracy is not None:
        out["val_accuracy"] = result.val_accuracy
    return out


def _spectral(probe: SpectralProbe) -> dict:
    """Expand a freshly initialised source model and measure every new layer against the muP
    condition ||W||_2 ~ sqrt(fan_out / fan_in) (paper §3.2, Table 1)."""
    from ..core.diagnostics import spectral_report
    from ..core.growth import expand_depth
    from ..core.models import build_model, make_config

    fields = dict(probe.model)
    source = make_config(fields.pop("kind", "gpt"), **fields).with_depth(probe.source_depth)
    torch.manual_seed(probe.seed)
    model = build_model(source)
    record = expand_depth(model, probe.target_depth, probe.method, generator_seed=probe.seed)
    assert model.config.depth == probe.target_depth
    new = [o.position for origins in record.origins.values() for o in origins if o.kind != "kept"]
    rows = [r for i in new for r in spectral_report(model, prefix=f"blocks.{i}.")]
    return {
        "rows": [r.to_dict() for r in rows],
        "val_loss": None,
        "flops": 0.0,
        "tokens": 0,
        "curve": [],
        "evals": [],
        "expansions": [],
    }
