"""Model and optimizer state for checkpoints, the same whatever the parallelism that wrote or reads it.

A checkpoint holds whole tensors (``model.pt``: the model's ``state_dict``; ``optimizer.pt``: the optimizer's,
its parameters named by their model FQN under FSDP, by position otherwise). Under FSDP2 the whole tensors are
gathered to rank 0's CPU to write (``torch.distributed.checkpoint.state_dict``, ``full_state_dict``) and each
rank takes its own shard on load, so a checkpoint written by N ranks, sharded or not, resumes on M.
"""

from __future__ import annotations

import torch
from torch import nn


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def model_state_dict(model: nn.Module, sharded: bool) -> dict:
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(True))  # rank 0 gets it all, others {}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(True))


def load_model_state(model: nn.Module, state: dict, sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A positional optimizer state dict (``optimizer.state_dict()``) keyed by parameter FQNs instead:
    position i is the i-th parameter of the optimizer's groups, which follow the model's order."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool
) -> None:
    positional = all(isinstance(i, int) for g in state["param_groups"] for i in g["params"])
    if positional and not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if positional:
        state = _by_name(model, optimizer, state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=sharded))
