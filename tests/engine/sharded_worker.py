"""One gloo rank for test_parallel.py: the distributed Muon-NSGD and the sharded expansion against their
one-process selves, on the same tensors. Writes rank 0's largest relative differences as JSON."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from progrow_ray.core import build_optimizer, expand_depth
from progrow_ray.core.growth import METHODS
from progrow_ray.engine.parallel import expand_sharded, shard_model
from tests.core.conftest import tiny


def whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(((whole(a[k]) - whole(b[k])).norm() / whole(b[k]).norm().clamp(min=1e-12)).item() for k in a)


def params(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def momenta(model, optimizer) -> dict:
    return {
        n: optimizer.state[p]["momentum_buffer"] for n, p in model.named_parameters() if p in optimizer.state
    }


def set_grads(model, step: int) -> None:
    """The same whole gradient on every rank (seeded by step and name); a sharded parameter gets its rows."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def optimizer_runs(kind: str, world_steps: int = 20) -> dict:
    """20 Muon-NSGD steps on one process, on FSDP2 shards, and on DDP replicas sharing the work."""
    out = {}
    if kind == "gpt-vocab":  # a vocabulary matrix heavier than a rank's share: split over all ranks
        reference = tiny("gpt", 2, vocab_size=4096)
    else:
        reference = tiny(kind, (1, 1, 1, 1) if kind == "resnet" else 2)
    sharded, replicated = copy.deepcopy(reference), copy.deepcopy(reference)
    shard_model(sharded, mixed_precision=False)
    optimizers = {}
    for name, model in (("one", reference), ("fsdp", sharded), ("ddp", replicated)):
        optimizers[name] = build_optimizer(model, "muon_nsgd", lr=0.02)
    optimizers["ddp"].share_work()
    for step in range(world_steps):
        for name, model in (("one", reference), ("fsdp", sharded), ("ddp", replicated)):
            set_grads(model, step)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
    for name, model in (("fsdp", sharded), ("ddp", replicated)):
        out[f"{kind}-{name}-params"] = rel_diff(params(model), params(reference))
        out[f"{kind}-{name}-momenta"] = rel_diff(
            momenta(model, optimizers[name]), momenta(reference, optimizers["one"])
        )
    return out


def expansion_runs() -> dict:
    """Every method, in two stages (0 or 1 -> 2 -> 5; plain copying, valid only from one layer: 1 -> 3),
    with and without the copied layers' optimizer state: sharded expansion == expand_depth, weights and
    momenta, and after two more steps."""
    out = {}
    for kind in ("gpt", "llama", "moe"):
        for method in METHODS:
            for copy_state in (False, True):
                source = 0 if method in ("random", "zero") else 1
                one = tiny(kind, source)
                sharded = copy.deepcopy(one)
                shard_model(sharded, mixed_precision=False)
                opt_one = build_optimizer(one, "muon_nsgd", lr=0.02)
                opt_sharded = build_optimizer(sharded, "muon_nsgd", lr=0.02)
                step = 0
                for stage, depth in enumerate((3,) if method == "copying" else (2, 5)):
                    for model, opt in ((one, opt_one), (sharded, opt_sharded)):
                        set_grads(model, step)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    step += 1
                    seed = 17 + stage
                    expand_depth(
                        one,
                        depth,
                        method,
                        optimizer=opt_one,
                        copy_optimizer_state=copy_state,
                        generator_seed=seed,
                    )
                    sharded, opt_sharded, _ = expand_sharded(
                        sharded,
                        opt_sharded,
                        depth,
                        method,
                        device=torch.device("cpu"),
                        shard=lambda m: shard_model(m, mixed_precision=False),
                        build_optimizer=lambda m: build_optimizer(m, "muon_nsgd", lr=0.02),
                        copy_optimizer_state=copy_state,
                        generator_seed=seed,
                    )
                    key = f"{kind}-{method}-{'copy' if copy_state else 'fresh'}-{depth}"
                    out[f"{key}-params"] = rel_diff(params(sharded), params(one))
                    if momenta(one, opt_one):
                        out[f"{key}-momenta"] = rel_diff(momenta(sharded, opt_sharded), momenta(one, opt_one))
                for _ in range(2):
                    for model, opt in ((one, opt_one), (sharded, opt_sharded)):
                        set_grads(model, step)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    step += 1
                out[f"{key}-after"] = rel_diff(params(sharded), params(one))
    return out


def count_splits() -> list:
    """Count the matrices the optimizer splits over the ranks (split_newton_schulz calls)."""
    import progrow_ray.core.optim as optim

    calls, original = [], optim.split_newton_schulz

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    optim.split_newton_schulz = counted
    return calls


def main(result_path: str, what: str) -> None:
    from progrow_ray.engine.parallel import end_process_group

    torch.set_num_threads(1)
    splits = count_splits()
    dist.init_process_group("gloo")
    clean = False
    try:
        torch.manual_seed(0)
        result = {}
        if "optimizer" in what:
            for kind in ("gpt", "gpt-vocab", "moe", "resnet"):
                before = len(splits)
                result.update(optimizer_runs(kind))
                # only the 4096 x 64 vocabulary matrix outweighs a rank's share: split, 20 steps x 2 modes
                assert len(splits) - before == (40 if kind == "gpt-vocab" else 0), (
                    kind,
                    len(splits) - before,
                )
        if "expansion" in what:
            result.update(expansion_runs())
        if dist.get_rank() == 0:
            with open(result_path, "w") as fh:
                json.dump(result, fh)
        clean = True
    finally:
        end_process_group(clean)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
