"""One reproduction trial, pure torch (no Ray, no MLflow): it runs wherever the engine runs, inside a
Ray Tune trial or in-process on a GPU machine without Ray.

A trial spec is a plain dict: ``{"id": str, "kind": "lm" | "image" | "spectral", ...}``; the result is
a plain dict with the curve (train loss by tokens — images for ResNet), final val loss and FLOPs.
"""

from __future__ import annotations

import time

import torch

from ..engine.config import RunConfig, from_dict


def run_trial(spec: dict, threads: int = 1, device: str | None = None) -> dict:
    torch.set_num_threads(max(1, threads))
    started = time.time()
    kind = spec["kind"]
    if kind == "lm":
        out = _lm(spec, device)
    elif kind == "image":
        out = _image(spec, device)
    elif kind == "spectral":
        out = _spectral(spec)
    else:
        raise ValueError(f"unknown trial kind {kind!r}")
    out["flops_paper"] = paper_flops(spec, out)
    return {"id": spec["id"], "meta": spec.get("meta", {}), "wall_s": time.time() - started, **out}


def paper_flops(spec: dict, result: dict) -> float:
    """The trial's FLOPs as the paper's eq. 1.1 counts them (6 x non-embedding parameters per token),
    from its config and where it expanded; a ResNet's count is the same either way."""
    if spec["kind"] != "lm":
        return result["flops"]
    cfg = from_dict(RunConfig, spec["run"])
    return cfg.run_flops("paper", tau_tokens=result["expansions"][-1] if result["expansions"] else None)


def _curve(history: list[dict]) -> dict:
    train = [e for e in history if e["event"] == "train"]
    evals = [e for e in history if e["event"] == "eval"]
    return {"curve": [[e["tokens"], e["train_loss"], e["flops"]] for e in train],
            "evals": [[e["tokens"], e["val_loss"], e["flops"]] for e in evals],
            "expansions": [e["tokens"] for e in history if e["event"] == "expand"]}


def _lm(spec: dict, device: str | None) -> dict:
    from ..engine.trainer import Trainer

    run = dict(spec["run"])
    if device:
        run["train"] = {**run.get("train", {}), "device": device}
    cfg = from_dict(RunConfig, run)
    trainer = Trainer(cfg, save_checkpoint=lambda *_: None, log=lambda _: None)
    result = trainer.run()
    return {"val_loss": result.val_loss, "flops": result.flops, "tokens": result.tokens, **_curve(trainer.history)}


def _image(spec: dict, device: str | None) -> dict:
    from ..core.models import ResNetConfig
    from ..engine.images import ImageRun, train_images

    fields = dict(spec["run"])
    target = ResNetConfig(**{**fields.pop("target"), "blocks": tuple(spec["run"]["target"]["blocks"])})
    if fields.get("source_blocks") is not None:
        fields["source_blocks"] = tuple(fields["source_blocks"])
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = train_images(ImageRun(target=target, **fields), device=dev)
    return {"val_loss": result["val_loss"], "val_accuracy": result["val_accuracy"], "flops": result["flops"],
            "tokens": result["tokens"], **_curve(result["history"])}


def _spectral(spec: dict) -> dict:
    """Expand a freshly initialised source model and measure every new layer against the muP
    condition ||W||_2 ~ sqrt(fan_out / fan_in) (paper §3.2, Table 1)."""
    from ..core.diagnostics import spectral_report
    from ..core.growth import expand_depth
    from ..core.models import build_model, make_config

    fields = dict(spec["model"])
    kind = fields.pop("kind", "gpt")
    target = make_config(kind, **{**fields, "n_layer": spec["target_depth"]})
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(make_config(kind, **{**fields, "n_layer": spec["source_depth"]}))
    record = expand_depth(model, spec["target_depth"], spec["method"], generator_seed=spec.get("seed", 0))
    assert model.config.n_layer == target.n_layer
    new = [o.position for origins in record.origins.values() for o in origins if o.kind != "kept"]
    rows = [r for i in new for r in spectral_report(model, prefix=f"blocks.{i}.")]
    return {"rows": [r.to_dict() for r in rows], "val_loss": None, "flops": 0.0, "tokens": 0,
            "curve": [], "evals": [], "expansions": []}
