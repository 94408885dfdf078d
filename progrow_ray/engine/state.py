"""Loading a whole-tensor checkpoint (``model.pt``, ``optimizer.pt``: what one process or DDP writes) into a
model of any parallelism: under FSDP2 each rank takes its own shard of every tensor
(``torch.distributed.checkpoint.state_dict``, ``full_state_dict``). Sharded checkpoints:
``sharded_checkpoint.py``.
"""

from __future__ import annotations

import torch
from torch import nn


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
