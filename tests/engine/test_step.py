"""The batch plan: micro-batches dealt over any number of ranks, weighted so that the update is the global
batch's mean whatever the world size."""

import contextlib
import copy

import pytest
import torch

from progrow_ray.core import build_model
from progrow_ray.engine.step import plan_batch, train_step


@pytest.mark.parametrize("examples,micro", [(16, 8), (16, 3), (8, 3), (5, 2), (2, 4)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("same_count", [False, True])
def test_the_ranks_cover_the_batch_once_in_order_with_weights_summing_to_one(
    examples, micro, world, same_count
):
    plans = [plan_batch(examples, micro, r, world, same_count) for r in range(world)]
    covered = []
    for p in plans:
        covered += list(range(p.first, p.first + p.count)) if p.sizes else []
    assert covered == list(range(examples))
    assert all(0 < s <= micro for p in plans for s in p.sizes)
    # DDP / FSDP average over the ranks: the weights, divided by the world, sum to one global mean
    assert sum(p.weight(s) for p in plans for s in p.sizes) / world == pytest.approx(1.0)
    assert plans[0].sizes  # rank 0 always trains (its BatchNorm buffers are the ones DDP broadcasts)
    passes = [len(p.sizes) + p.padding for p in plans]
    assert min(passes) >= 1  # every rank joins the gradient synchronisation
    if same_count:
        assert len(set(passes)) == 1  # FSDP: every rank runs as many collectives
    assert max(len(p.sizes) for p in plans) - min(len(p.sizes) for p in plans) <= 1


def test_uneven_micro_batches_give_the_full_batch_gradient():
    """8 sequences in micro-batches 3, 3, 2 (weights 3/8, 3/8, 2/8) step exactly like one pass over all 8;
    the reported loss is the full batch's mean."""
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=2, vocab_size=96, block_size=16, n_embd=32, head_dim=16)
    twin = copy.deepcopy(model)
    x, y = torch.randint(0, 96, (8, 16)), torch.randint(0, 96, (8, 16))
    plan = plan_batch(8, 3, rank=0, world=1, same_count=False)
    assert plan.sizes == (3, 3, 2)
    reported = train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        x,
        y,
        plan,
        torch.device("cpu"),
        contextlib.nullcontext,
    )
    _, loss = twin(x, y)
    loss.backward()
    torch.optim.SGD(twin.parameters(), lr=1.0).step()
    assert reported.item() == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
