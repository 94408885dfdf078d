"""Optimizers: the paper's Muon-NSGD and an AdamW factory, with parameter groups that survive growth.

Muon-NSGD (paper §2, App. B): every tensor with >= 2 dims gets Muon — momentum (Nesterov, as Jordan
et al.'s Muon), then Newton–Schulz orthogonalisation — and every other tensor gets normalised SGD,
``W <- (1 - lr wd) W - lr m_t / ||m_t||`` with the plain momentum m_t, as the paper writes it (Nesterov
on request). One learning rate for both, decoupled weight decay.

The Muon update of each matrix is scaled by a factor of its logical (fan_out, fan_in) (``core/layouts.py``),
the convention ``muon_scale`` picks (``MUON_SCALES``). The paper lists two departures from Jordan et al.'s
Muon — "optimizing all 2D tensors with Muon and other tensors with NSGD" and "a single learning rate" — so
the default keeps Jordan's factor sqrt(max(1, fan_out / fan_in)); its App. B formula, W - lr NS(m), with
no factor, is ``none``. An embedding is read as the d x vocab map it is (one-hot input), so ``jordan``
gives it 1 (it gave an untied V x d embedding sqrt(V / d) by its storage).

Every parameter group carries a ``kind`` ("muon" / "nsgd" or "decay" / "no_decay") and a ``family``
("muon_nsgd" / "adamw"), so ``sync_param_groups`` can place the parameters of new layers after a
depth expansion without knowing anything about the model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
from torch import nn

from . import owners
from .errors import ConfigError, require
from .layouts import MatrixLayout, layout_from_shape, matrix_layouts

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # isinstance(x, ()) is False

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: fast, lands sigma in ~[0.7, 1.2]
FAMILIES = ("muon_nsgd", "adamw")
MUON_SCALES = ("jordan", "none", "spectral")


def muon_scale_factor(layout: MatrixLayout, convention: str) -> float:
    """The multiplier of an orthogonalised update (spectral norm ~1) of one of ``layout``'s matrices.

    jordan    sqrt(max(1, fan_out / fan_in)) (Jordan et al. 2024; torch.optim.Muon's default)
    none      1: the paper's App. B update, W - lr NS(m)
    spectral  sqrt(fan_out / fan_in): the update's size the muP spectral condition asks for
              (Yang, Simon & Bernstein 2023)
    """
    if convention == "none":
        return 1.0
    if convention == "jordan":
        return max(1.0, layout.fan_out / layout.fan_in) ** 0.5
    if convention == "spectral":
        return (layout.fan_out / layout.fan_in) ** 0.5
    raise ConfigError(f"optimizer.muon_scale must be one of {list(MUON_SCALES)}, got {convention!r}")


def newton_schulz(
    G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of ``G`` (batched over leading dims): pushes
    every singular value towards 1, keeping the singular vectors."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (batch, rows, cols)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # fused b*A + c*A@A, as torch.optim.Muon
        X = torch.baddbmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def split_newton_schulz(
    X: torch.Tensor, group, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``newton_schulz`` of a matrix whose columns are split over the ranks of ``group``: ``X`` is this
    rank's (rows, cols_r) block, rows <= total columns. The Gram matrix X X^T and the norm are sums over
    the blocks (one small all-reduce each), the rest is local: every rank does 1/N of the work. Returns this
    rank's block of the result."""
    import torch.distributed as dist

    a, b, c = NS_COEFFICIENTS
    out_dtype = X.dtype
    X = X.to(dtype)
    norm_sq = X.float().pow(2).sum()
    dist.all_reduce(norm_sq, group=group)
    X = X / norm_sq.sqrt().clamp(min=eps).to(dtype)
    for _ in range(steps):
        A = (X @ X.mT).float()  # summed over the ranks in fp32, whatever the iteration's dtype
        dist.all_reduce(A, group=group)
        A = A.to(dtype)
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.to(out_dtype)


class MuonNSGD(torch.optim.Optimizer):
    """Muon for >= 2-D tensors, NSGD for the rest, one learning rate (paper's Muon-NSGD).

    Why not ``torch.optim.Muon``: it rejects every tensor that is not 2-D (conv kernels, stacked MoE
    experts) and has no NSGD branch; keeping both in one optimizer gives one state dict and one
    learning rate to schedule. For 2-D tensors with ``ns_dtype=torch.bfloat16`` the update is the
    same as ``torch.optim.Muon`` (tests/core/test_optim.py checks it).

    Same-shape Muon updates are stacked and orthogonalised in one batched Newton–Schulz call (a GPT
    has L copies of each block matrix), which keeps the step close to AdamW's cost on a GPU.

    ``layouts`` maps parameters to their ``MatrixLayout`` (``build_optimizer`` takes it from the model);
    a parameter not in it is read by its shape (``layouts.layout_from_shape``).
    ``nesterov`` / ``nsgd_nesterov``: the momentum form of the Muon / NSGD groups.

    Data parallel (``core/owners.py``): with FSDP2's sharded (DTensor) parameters, or with replicated
    (DDP) parameters once ``share_work(group)`` is called, each matrix is orthogonalised once in the group,
    by an owner rank chosen to balance the work, and NSGD's norms are taken over the whole tensor. The
    update equals the one-process optimizer's; momenta stay where the parameters are (sharded or not).
    ``ns_split``: a matrix heavier than a rank's share is split over all ranks instead (equal to one process
    up to float summation order); False keeps every matrix whole on one owner (the one-process arithmetic
    per matrix; on CPU the same bits at any world size).
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
        eps: float = 1e-7,
        muon_scale: str = "jordan",
        nsgd_nesterov: bool = False,
        layouts: Mapping[torch.Tensor, MatrixLayout] | None = None,
        ns_split: bool = True,
    ):
        require(lr >= 0, f"optimizer.lr must be >= 0, got {lr}")
        require(0 <= momentum < 1, f"optimizer.momentum must be in [0, 1), got {momentum}")
        require(weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {weight_decay}")
        require(ns_steps >= 1, f"optimizer.ns_steps must be >= 1, got {ns_steps}")
        require(
            muon_scale in MUON_SCALES,
            f"optimizer.muon_scale must be one of {list(MUON_SCALES)}, got {muon_scale!r}",
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            eps=eps,
            muon_scale=muon_scale,
            kind=None,
            family="muon_nsgd",
        )
        params = list(params)
        if params and isinstance(params[0], dict):  # a group's own "nesterov" wins
            params = [{"nesterov": nsgd_nesterov, **g} if g.get("kind") == "nsgd" else g for g in params]
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.layouts: dict[torch.Tensor, MatrixLayout] = dict(layouts or {})
        for group in self.param_groups:
            if group["kind"] is None:  # plain parameter list: split it the standard way
                require(
                    all(p.ndim >= 2 for p in group["params"]) or all(p.ndim < 2 for p in group["params"]),
                    "MuonNSGD: pass parameter groups from param_groups(model, 'muon_nsgd'), or give each "
                    "group a 'kind'",
                )
                group["kind"] = "muon" if group["params"] and group["params"][0].ndim >= 2 else "nsgd"
                group["nesterov"] = nesterov if group["kind"] == "muon" else nsgd_nesterov
            require(
                group["kind"] in ("muon", "nsgd"),
                f"MuonNSGD group kind must be 'muon' or 'nsgd', got {group['kind']!r}",
            )

        # what this optimizer was built with: a checkpoint's param groups must not override them on load
        self._forms = {g["kind"]: {k: g[k] for k in ("nesterov", "muon_scale")} for g in self.param_groups}
        self.replica_group = None  # DDP: the group whose ranks share the Newton–Schulz work
        self.ns_split = ns_split

    def share_work(self, group=None) -> None:
        """Parameters replicated over ``group`` (DDP; None: the default group): from now on each matrix's
        Newton–Schulz runs once, on its owner rank, and the results are shared."""
        import torch.distributed as dist

        self.replica_group = group if group is not None else dist.group.WORLD

    def __setstate__(self, state: dict) -> None:  # copy / pickle keep only torch's fields
        super().__setstate__(state)
        self.__dict__.setdefault("layouts", {})
        self.__dict__.setdefault("ns_dtype", None)
        self.__dict__.setdefault("_forms", {})
        self.__dict__.setdefault("replica_group", None)
        self.__dict__.setdefault("ns_split", True)

    def __getstate__(self) -> dict:  # a process group does not pickle; a copy runs on its own
        own = {k: self.__dict__[k] for k in ("ns_dtype", "_forms", "ns_split") if k in self.__dict__}
        return {**super().__getstate__(), **own, "replica_group": None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Momenta from the checkpoint, the momentum form and Muon scale from the config: a run resumed
        under a config that changed them uses the config's."""
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            g.update(self._forms.get(g["kind"], {}))

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: exact and reproducible

    def _momentum_direction(self, p: torch.Tensor, group: Mapping) -> torch.Tensor:
        """This rank's part of the momentum direction of ``p`` (all of it unless ``p`` is sharded)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor for a DTensor parameter
        buf, grad = _local(state["momentum_buffer"]), _local(p.grad)
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()

    def _sharding(self, params: list[torch.Tensor]):
        """(process group, sharded?) the update of ``params`` spans: FSDP2's mesh, the DDP group of
        ``share_work``, or (None, False) for one process."""
        sharded = [isinstance(p, DTensor) for p in params]
        if any(sharded):
            require(all(sharded), "MuonNSGD: a parameter group mixes sharded (DTensor) and plain tensors")
            meshes = {p.device_mesh for p in params}
            require(
                len(meshes) == 1 and params[0].device_mesh.ndim == 1,
                "MuonNSGD: sharded parameters must share one 1-D device mesh (FSDP2's data-parallel mesh)",
            )
            return params[0].device_mesh.get_group(), True
        group = self.replica_group
        if group is not None:
            import torch.distributed as dist

            if dist.get_world_size(group) > 1:
                return group, False
        return None, False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            pg, sharded = self._sharding(params)
            directions = [self._momentum_direction(p, group) for p in params]
            if group["kind"] == "nsgd":
                self._nsgd_update(params, directions, group, pg if sharded else None)
            else:
                self._muon_update(params, directions, group, pg, sharded)
        return loss

    def _nsgd_update(self, params, directions, group, shard_group) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        if shard_group is None:
            norms = [d.norm() for d in directions]
        else:  # the norm of the whole tensor: local sums of squares, summed over the shards
            import torch.distributed as dist

            squares = torch.stack([d.pow(2).sum() for d in directions])
            dist.all_reduce(squares, group=shard_group)
            norms = list(squares.sqrt())
        for p, d, norm in zip(params, directions, norms):
            local = _local(p)
            local.mul_(1 - lr * wd)
            local.add_(d / (norm + eps), alpha=-lr)

    def _muon_update(self, params, directions, group, pg, sharded: bool) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        convention = group.get("muon_scale", "jordan")  # checkpoints from before the option: jordan
        layouts = [self.layouts.get(p) or layout_from_shape(p) for p in params]
        if pg is None:
            updates = self._orthogonalise(dict(enumerate(directions)), layouts, group)
            updates = [updates[i] for i in range(len(params))]
        else:
            updates = self._shared_orthogonalise(params, directions, layouts, group, pg, sharded)
        for p, layout, u in zip(params, layouts, updates):
            local = _local(p)
            local.mul_(1 - lr * wd)
            local.add_(u, alpha=-lr * muon_scale_factor(layout, convention))

    def _shared_orthogonalise(self, params, directions, layouts, group, pg, sharded: bool) -> list:
        """Newton–Schulz of every direction once in the group ``pg``. A matrix heavier than a rank's even
        share whose stored rows are its long side (a GPT's tied vocabulary matrix) is split by those rows
        over all ranks (``split_newton_schulz``); every other one goes whole to an owner rank, balanced by
        cost. Returns this rank's part of each result (a shard under FSDP, the whole tensor under DDP)."""
        import torch.distributed as dist

        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        costs = [newton_schulz_cost(lay) for lay in layouts]
        split = split_matrices(params, layouts, costs, world) if self.ns_split else [False] * len(params)
        shapes = [p.shape for p in params]  # global shapes (a DTensor's size is the whole tensor's)
        whole_ids = [i for i in range(len(params)) if not split[i]]
        owner = owners.assign_owners([costs[i] for i in whole_ids], world)
        sub_shapes = [shapes[i] for i in whole_ids]
        if not whole_ids:
            gathered = {}
        elif sharded:
            gathered = owners.gather_to_owners([directions[i] for i in whole_ids], sub_shapes, owner, pg)
        else:
            gathered = {k: directions[i] for k, i in enumerate(whole_ids) if owner[k] == rank}
        sub_layouts = [layouts[i] for i in whole_ids]
        results = self._orthogonalise(gathered, sub_layouts, group)
        updates: list = [None] * len(params)
        if sharded and whole_ids:
            local = owners.scatter_from_owners(results, sub_shapes, owner, pg, like=directions[0])
            for k, i in enumerate(whole_ids):
                updates[i] = local[k]
        dtype = self._ns_dtype(directions[0].device)
        partial = {}  # DDP: results (whole, or this rank's rows of a split matrix) to share in one all-reduce
        for i in (i for i in range(len(params)) if split[i]):
            rows = owners.dim0_rows(shapes[i][0], world)
            mine = directions[i] if sharded else directions[i].narrow(0, sum(rows[:rank]), rows[rank])
            block = split_newton_schulz(mine.mT, pg, group["ns_steps"], group["eps"], dtype).mT
            if sharded:
                updates[i] = block
            else:
                partial[i] = torch.zeros_like(directions[i])
                partial[i].narrow(0, sum(rows[:rank]), rows[rank]).copy_(block)
        if not sharded:
            partial.update({whole_ids[k]: u for k, u in results.items()})
            updates = owners.share_from_owners(partial, shapes, pg, like=directions[0])
        return updates

    def _orthogonalise(self, whole: dict[int, torch.Tensor], layouts, group) -> dict[int, torch.Tensor]:
        """Newton–Schulz of the whole tensors given (stored shapes), same-shape matrices in one batch."""
        by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, d in whole.items():
            m = layouts[i].matrices(d)
            by_shape[(tuple(m.shape), m.device, m.dtype)].append((i, m))
        out = {}
        for (_, device, _), items in by_shape.items():
            stacked = torch.stack([m for _, m in items])
            ortho = newton_schulz(stacked, group["ns_steps"], group["eps"], self._ns_dtype(device))
            for (i, _), u in zip(items, ortho.unbind(0)):
                out[i] = layouts[i].stored(u, whole[i])
        return out


def newton_schulz_cost(layout: MatrixLayout) -> int:
    """The multiply-adds of orthogonalising ``layout``'s matrices, up to a constant: what owners balance."""
    return layout.batch * layout.fan_out * layout.fan_in * min(layout.fan_out, layout.fan_in)


def split_matrices(params, layouts, costs, world: int) -> list[bool]:
    """Which matrices ``ns_split`` splits over ``world`` ranks: heavier than a rank's even share, and stored
    with their long side as rows (``rows_are_long_side``). The optimizer and the memory estimate both ask."""
    total = sum(costs)
    return [c * world > total and rows_are_long_side(p, lay) for p, lay, c in zip(params, layouts, costs)]


def rows_are_long_side(p: torch.Tensor, layout: MatrixLayout) -> bool:
    """Whether ``p``'s stored rows (dim 0, what FSDP2 shards) are the columns Newton–Schulz iterates over:
    a single matrix stored (long, short) — a linear map with fan_out > fan_in, or an embedding (vocab, d)."""
    return (
        p.ndim == 2
        and layout.batch == 1
        and layout.role in ("linear", "embedding")
        and p.shape[0] > p.shape[1]
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (same storage, so in-place ops update it)."""
    return t.to_local() if isinstance(t, DTensor) else t


# ---- parameter groups ----------------------------------------------------------------------------


def classify(family: str, name: str, p: torch.Tensor) -> str:
    """Which group of ``family`` a parameter belongs to. Embeddings are matrices too: Muon (paper)."""
    if family == "muon_nsgd":
        return "muon" if p.ndim >= 2 else "nsgd"
    if family == "adamw":
        return "decay" if p.ndim >= 2 else "no_decay"
    raise ConfigError(f"optimizer.name must be one of {list(FAMILIES)}, got {family!r}")


def kinds_of(family: str) -> tuple[str, str]:
    return ("muon", "nsgd") if family == "muon_nsgd" else ("decay", "no_decay")


def param_groups(model: nn.Module, family: str, **group_options) -> list[dict]:
    """All trainable parameters of ``model`` in model order, split by ``classify``; every kind gets
    a group even when empty (a 0-layer model's first block brings the first of some kind)."""
    groups = {
        kind: {"params": [], "kind": kind, "family": family, **group_options} for kind in kinds_of(family)
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[classify(family, name, p)]["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str = "muon_nsgd",
    lr: float = 0.01,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    betas: tuple[float, float] = (0.9, 0.95),
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
    fused: bool | None = None,
    muon_scale: str = "jordan",
    nesterov: bool = True,
    nsgd_nesterov: bool = False,
    ns_split: bool = True,
) -> torch.optim.Optimizer:
    """``muon_nsgd`` (paper default: lr 0.01, wd 0.1) or ``adamw`` (paper's comparison: lr 1e-3).
    AdamW decays only >= 2-D tensors (nanoGPT); Muon-NSGD decays all, as the paper writes it."""
    if name == "muon_nsgd":
        return MuonNSGD(
            param_groups(model, name),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            muon_scale=muon_scale,
            nesterov=nesterov,
            nsgd_nesterov=nsgd_nesterov,
            layouts=matrix_layouts(model),
            ns_split=ns_split,
        )
    if name == "adamw":
        groups = param_groups(model, name)
        for g in groups:
            g["weight_decay"] = weight_decay if g["kind"] == "decay" else 0.0
        device = next(model.parameters()).device
        use_fused = (device.type == "cuda") if fused is None else fused
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=use_fused)
    raise ConfigError(f"optimizer.name must be one of {list(FAMILIES)}, got {name!r}")


def sync_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    copied_from: Mapping[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """Make ``optimizer`` cover exactly ``model``'s parameters after a depth expansion.

    Old parameters keep their state (momentum, Adam moments) untouched; new ones start fresh, or,
    if ``copied_from`` maps a new parameter to the one it was copied from, with a copy of that
    state. Group lists are rebuilt in model order, so an optimizer built fresh on the expanded model
    has the same layout and ``load_state_dict`` of a checkpoint taken after expansion lines up.
    Returns the number of parameters added.
    """
    groups = {g.get("kind"): g for g in optimizer.param_groups}
    family = optimizer.param_groups[0].get("family")
    require(
        family in FAMILIES and set(groups) == set(kinds_of(family)),
        "sync_param_groups needs an optimizer from progrow_ray.core.optim.build_optimizer",
    )
    before = {p for g in optimizer.param_groups for p in g["params"]}
    lists: dict[str, list] = {kind: [] for kind in groups}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lists[classify(family, name, p)].append(p)
    for kind, g in groups.items():
        g["params"] = lists[kind]
    now = {p for ps in lists.values() for p in ps}
    for gone in [p for p in optimizer.state if p not in now]:
        del optimizer.state[gone]
    if isinstance(optimizer, MuonNSGD):  # new matrices: their layouts (old keys of gone tensors dropped)
        optimizer.layouts = matrix_layouts(model)
    for new, src in (copied_from or {}).items():
        if new in now and src in optimizer.state:
            optimizer.state[new] = {
                k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[src].items()
            }
    return len(now - before)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
