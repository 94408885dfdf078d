import math

import pytest
import torch

from progrow_ray.core import ConfigError
from progrow_ray.core.schedule import step_lr
from progrow_ray.engine import NonFiniteLossError, Trainer, read_checkpoint
from progrow_ray.engine.trainer import default_manager

from .conftest import make_cfg


def losses_of(events):
    return [(e["step"], e["train_loss"]) for e in events if e["event"] == "train"]


def run(cfg, until=None, resume=None):
    events = []
    t = Trainer(cfg, resume=resume, on_metrics=events.append, log=lambda _: None)
    result = t.run(until_tokens=until)
    return t, result, events


def test_progressive_run_expands_at_tau_and_changes_batch(prepared, tmp_path):
    cfg = make_cfg(prepared, str(tmp_path), growth={"tau_frac": 0.375, "batch_tokens_after": 1024})
    t, result, events = run(cfg)
    # τ = 3072 tokens = 6 steps of 512; then 5 steps of 1024 reach 8192
    expand = [e for e in events if e["event"] == "expand"]
    assert len(expand) == 1 and expand[0]["tokens"] == 3072 and expand[0]["step"] == 6
    assert result.expanded_at_tokens == 3072 and result.depth == 2 and result.step == 11
    assert result.tokens == 8192 and math.isfinite(result.val_loss)
    trains = [e for e in events if e["event"] == "train"]
    assert [e["depth"] for e in trains] == [0] * 6 + [2] * 5
    assert [e["batch_tokens"] for e in trains] == [512] * 6 + [1024] * 5
    # the schedule continues by tokens across the batch change
    sched = cfg.schedule_fn()
    for e in trains:
        b = e["batch_tokens"]
        assert e["lr"] == pytest.approx(step_lr(sched, cfg.optimizer.lr, e["tokens"] - b, b))
    # FLOPs: zero-layer cost before τ, full cost after

    small = cfg.source_model_config().train_flops_per_unit(seq_len=32)
    large = cfg.target_model_config().train_flops_per_unit(seq_len=32)
    assert result.flops == pytest.approx(small * 3072 + large * 5120)
    state = read_checkpoint(result.checkpoint, names=["state.json"])["state.json"]
    assert state["progress"]["growth"][0]["target_depths"] == {"blocks": 2}


def test_multi_stage_growth_expands_twice_and_resumes_between_stages(prepared, tmp_path):
    """0 -> 1 -> 3 layers (paper §6): two expansions, FLOPs per stage, and a stop between the stages."""
    stages = {
        "model": {"n_layer": 3},
        "growth": {"tau_frac": 0.5, "stages": [{"depth": 1, "tau_frac": 0.25}]},
    }
    cfg = make_cfg(prepared, str(tmp_path / "full"), **stages)
    _, full, events = run(cfg)
    expand = [e for e in events if e["event"] == "expand"]
    assert [(e["tokens"], e["source_depth"], e["target_depth"]) for e in expand] == [
        (2048, {"blocks": 0}, {"blocks": 1}),
        (4096, {"blocks": 1}, {"blocks": 3}),
    ]
    assert [e["depth"] for e in events if e["event"] == "train"] == [0] * 4 + [1] * 4 + [3] * 8
    from dataclasses import replace

    target = cfg.target_model_config()
    per = [target.with_depth(d).train_flops_per_unit(seq_len=32) for d in (0, 1, 3)]
    assert full.flops == pytest.approx(per[0] * 2048 + per[1] * 2048 + per[2] * 4096)
    split = replace(cfg, out=str(tmp_path / "split"))
    _, first, first_events = run(split, until=3072)  # between the two expansions
    _, files = default_manager(split).load_latest()
    _, second, second_events = run(split, resume=files)
    assert losses_of(first_events) + losses_of(second_events) == losses_of(events)
    assert second.val_loss == full.val_loss
    with pytest.raises(ConfigError, match="strictly increase"):
        make_cfg(
            prepared,
            str(tmp_path),
            model={"n_layer": 3},
            growth={"tau_frac": 0.5, "stages": [{"depth": 1, "tau_frac": 0.6}]},
        )
    with pytest.raises(ConfigError, match="growth.stages\\[0\\]"):
        make_cfg(prepared, str(tmp_path), growth={"stages": [{"layers": 1}]})


def test_fixed_size_run(prepared, tmp_path):
    cfg = make_cfg(prepared, str(tmp_path), growth={"enabled": False})
    t, result, events = run(cfg)
    assert result.depth == 2 and not result.expanded
    assert not [e for e in events if e["event"] == "expand"]
    first, last = losses_of(events)[0][1], losses_of(events)[-1][1]
    assert last < first - 1.0  # it learns


@pytest.mark.parametrize("stop_at", [2048, 4096])  # before τ (4096) and exactly at it
def test_resume_reproduces_the_uninterrupted_run_bit_exactly(prepared, tmp_path, stop_at):
    full_cfg = make_cfg(prepared, str(tmp_path / "full"))
    _, full, full_events = run(full_cfg)
    cfg = make_cfg(prepared, str(tmp_path / "split"))
    _, first, first_events = run(cfg, until=stop_at)
    assert first.tokens == stop_at and not first.finished
    uri, files = default_manager(cfg).load_latest()
    assert uri == first.checkpoint
    _, second, second_events = run(cfg, resume=files)
    assert losses_of(first_events) + losses_of(second_events) == losses_of(full_events)
    assert second.val_loss == full.val_loss
    assert second.flops == full.flops


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    cfg = make_cfg(
        prepared,
        str(tmp_path),
        growth={"enabled": False},
        train={"checkpoint_every_tokens": 1024, "log_every": 2},
    )
    t = Trainer(cfg, log=lambda _: None)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] > 4 * 2:  # from step 5 on (2 micro-steps per step): the step-4 checkpoint is good
            return output * float("nan")
        return output

    t.model.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        t.run()
    uri, files = default_manager(cfg).load_latest()
    assert files["state.json"]["progress"]["step"] == 4  # the checkpoint at 1024 x 2 tokens
    assert all(torch.isfinite(v).all() for v in files["model.pt"].values())


def test_bad_run_settings(prepared, tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_tokens \(500\) must be a multiple of data.seq_len"):
        make_cfg(prepared, str(tmp_path), train={"batch_tokens": 500})
    with pytest.raises(ConfigError, match="not before the decay start"):
        make_cfg(prepared, str(tmp_path), growth={"tau_frac": 0.9})
    with pytest.raises(ConfigError, match="cannot copy from a 0-layer"):
        make_cfg(prepared, str(tmp_path), growth={"method": "copying"})
    with pytest.raises(ConfigError, match="below the source"):
        make_cfg(prepared, str(tmp_path), growth={"source_depth": 3})
    with pytest.raises(ConfigError, match="unknown config key"):
        make_cfg(prepared, str(tmp_path), train={"batch": 3})
    with pytest.raises(ConfigError, match="train.total_tokens must be an integer"):
        make_cfg(prepared, str(tmp_path), train={"total_tokens": "lots"})
    with pytest.raises(ConfigError, match="vocab_size"):  # at config load, before any worker starts
        make_cfg(prepared, str(tmp_path), model={"vocab_size": 1000})
    with pytest.raises(ConfigError, match="optimizer.name must be one of"):
        make_cfg(prepared, str(tmp_path), optimizer={"name": "sgd"})
    assert make_cfg(prepared, str(tmp_path), train={"total_tokens": "8.192e3"}).train.total_tokens == 8192


def test_moe_trains_on_router_losses_but_reports_the_lm_loss():
    """train_step backpropagates CE + aux + z-loss and returns CE alone; the validation loss is CE."""
    import contextlib
    import copy

    from progrow_ray.core import build_model
    from progrow_ray.engine.step import plan_batch, train_step

    torch.manual_seed(0)
    model = build_model("moe", n_layer=1, vocab_size=96, block_size=16, n_embd=32, head_dim=16, n_experts=4)
    twin = copy.deepcopy(model)
    x = torch.randint(0, 96, (4, 16))
    y = torch.randint(0, 96, (4, 16))
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    plan = plan_batch(4, 2, rank=0, world=1, same_count=False)
    reported = train_step(model, sgd, x, y, plan, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    ce, objective = [], []
    for i in range(2):  # the same two micro-batches by hand
        _, loss = twin(x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2])
        total = loss + twin.auxiliary_loss()
        (total / 2).backward()
        ce.append(loss.item())
        objective.append(total.item())
    assert reported.item() == pytest.approx(sum(ce) / 2, rel=1e-6) and sum(objective) > sum(ce)
    torch.optim.SGD(twin.parameters(), lr=1.0).step()
    router, twin_router = model.blocks[0].mlp.router.weight, twin.blocks[0].mlp.router.weight
    torch.testing.assert_close(router, twin_router)  # the router got the aux / z-loss gradients too


def test_wall_clock_cadence_and_a_requested_checkpoint(prepared, tmp_path):
    """train.checkpoint_every_s saves at the first logged step past the interval (here: every one), a
    checkpoint request (a preemption notice) saves at the step it is made, and the run trains the same."""
    from progrow_ray.engine.trainer import default_manager

    base = {"total_tokens": 4096, "log_every": 2, "keep_checkpoints": 20}
    ref_events = []
    Trainer(
        make_cfg(prepared, str(tmp_path / "ref"), train=base),
        on_metrics=ref_events.append,
        log=lambda _: None,
    ).run()
    timed_cfg = make_cfg(prepared, str(tmp_path / "timed"), train={**base, "checkpoint_every_s": 1e-9})
    timed_events = []
    Trainer(timed_cfg, on_metrics=timed_events.append, log=lambda _: None).run()
    steps = sorted(default_manager(timed_cfg)._steps())
    assert steps == [2, 4, 6, 8]  # every logged step before the end, and the end
    asked, logged = [], []

    def preemption() -> str | None:
        asked.append(1)
        return "preemption" if len(asked) == 2 else None  # the notice comes at the second logged step

    asked_cfg = make_cfg(prepared, str(tmp_path / "asked"), train=base)
    Trainer(asked_cfg, checkpoint_requested=preemption, log=logged.append).run()
    assert sorted(default_manager(asked_cfg)._steps()) == [4, 8]
    assert "checkpoint at 2,048 tokens (preemption)" in logged and len(asked) == 4
    losses = lambda evs: [e["train_loss"] for e in evs if e["event"] == "train"]  # noqa: E731
    assert losses(timed_events) == losses(ref_events)
