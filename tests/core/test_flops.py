import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from progrow_ray.core import ConfigError
from progrow_ray.core.flops import plan_savings, run_flops
from progrow_ray.core.models import GPTConfig

from .conftest import batch, tiny


def counted_train_flops(model, x, y) -> int:
    # The math SDPA backend runs attention as bmm's the counter sees; the fused CPU kernel is not
    # registered with FlopCounterMode and would count as zero.
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, y)[1].backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "kind,depth,over",
    [
        ("gpt", 0, {}),
        ("gpt", 3, {}),
        ("gpt", 2, dict(bias=True)),
        ("llama", 2, {}),
        ("moe", 2, dict(capacity_factor=1.0)),
        ("moe", 3, dict(capacity_factor=1.0, moe_every=2)),
    ],
)
def test_token_flops_match_torch_flop_counter(kind, depth, over):
    model = tiny(kind, depth, **over)
    x, y = batch(kind, n=4)
    counted = counted_train_flops(model, x, y)
    predicted = model.config.train_flops_per_unit(seq_len=x.size(1)) * x.numel()
    assert predicted == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("blocks", [(1, 1, 1, 1), (2, 3, 2, 1)])
@pytest.mark.parametrize("stem,size", [("cifar", 16), ("imagenet", 64)])
def test_image_flops_match_torch_flop_counter(blocks, stem, size):
    model = tiny("resnet", blocks, stem=stem)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, 10, (2,))
    counted = counted_train_flops(model, x, y)
    predicted = model.config.train_flops_per_unit(image_size=size) * 2
    assert predicted == pytest.approx(counted, rel=0.05)


def test_zero_layer_gpt2_costs_a_fraction_of_124m():
    large = GPTConfig()  # 124M, 12 layers
    small = large.with_depth(0)
    ratio = small.train_flops_per_unit() / large.train_flops_per_unit()
    assert 0.1 < ratio < 0.3  # only the head's matmul remains


def test_run_cost_and_savings_planner():
    large = GPTConfig()
    rows = plan_savings(large, 0, total_units=10_000_000_000, tau_fracs=[0.0, 0.5, 0.8, 1.0])
    assert rows[0].flops_fraction == pytest.approx(1.0)
    s, big = large.with_depth(0).train_flops_per_unit(), large.train_flops_per_unit()
    assert rows[2].progressive_flops == pytest.approx(s * 8e9 + big * 2e9)
    assert rows[2].flops_fraction == pytest.approx((0.8 * s + 0.2 * big) / big)
    assert rows[1].speedup < rows[2].speedup
    assert rows[3].flops_fraction == pytest.approx(s / big)
    assert run_flops(1.0, 3.0, 10, 4) == 4 + 18
    with pytest.raises(ConfigError):
        run_flops(1.0, 3.0, 10, 11)
    with pytest.raises(ConfigError):
        plan_savings(large, 0, 100, [1.5])


def test_both_conventions_and_the_papers_5x():
    """The paper's eq. 1.1 counts 6 x non-embedding parameters: from zero layers at tau = 0.8 T that is
    0.2 of the fixed run (its "5x") at 124M; counting the head and attention, 0.417 (2.40x)."""
    large = GPTConfig(block_size=1024)
    full = plan_savings(large, 0, 10_000_000_000, [0.8], seq_len=1024)[0]
    paper = plan_savings(large, 0, 10_000_000_000, [0.8], seq_len=1024, convention="paper")[0]
    assert paper.flops_fraction == pytest.approx(0.200, abs=1e-9) and paper.speedup == pytest.approx(5.0)
    assert full.flops_fraction == pytest.approx(0.417, abs=5e-4) and full.speedup == pytest.approx(
        2.40, abs=5e-3
    )
    assert large.train_flops_per_unit(convention="paper") == 6 * 12 * 12 * 768**2
    at_end = plan_savings(large, 0, 10_000_000_000, [1.0], seq_len=1024, convention="paper")[0]
    assert at_end.progressive_flops == 0 and at_end.speedup == float("inf")  # no division by zero
    with pytest.raises(ConfigError, match="convention"):
        large.train_flops_per_unit(convention="kaplan")


def test_seven_b_preset_gives_4_6_to_5x_under_the_papers_count():
    from pathlib import Path

    from progrow_ray.engine.config import load_run_config
    from progrow_ray.orchestration.config import PipelineConfig

    cfg = load_run_config(Path(__file__).parents[2] / "jobs" / "gpt2-7b-60l.yaml", [], cls=PipelineConfig)
    target, total = cfg.target_model_config(), cfg.train.total_tokens
    speedups = [
        plan_savings(target, src, total, [0.8], seq_len=1024, convention="paper")[0].speedup for src in (0, 1)
    ]
    assert speedups[0] == pytest.approx(5.0) and 4.6 <= speedups[1] < 5.0
    assert 4.6 <= plan_savings(target, 0, total, [0.8], seq_len=1024)[0].speedup < 5.0  # full count: 4.61x


def test_run_flops_of_a_config_follow_its_expansions():
    from progrow_ray.engine.config import RunConfig, from_dict

    cfg = from_dict(
        RunConfig,
        {
            "model": {"kind": "gpt", "n_layer": 4, "n_embd": 64, "head_dim": 16},
            "growth": {"source_depth": 0, "tau_frac": 0.5, "stages": [{"depth": 2, "tau_frac": 0.25}]},
            "train": {"total_tokens": 1000},
            "data": {"seq_len": 32},
        },
    )
    target = cfg.target_model_config()
    per = {d: target.with_depth(d).train_flops_per_unit(seq_len=32, convention="paper") for d in (0, 2, 4)}
    assert cfg.run_flops("paper") == pytest.approx(per[0] * 250 + per[2] * 250 + per[4] * 500)
    assert cfg.run_flops("paper", tau_tokens=600) == pytest.approx(per[0] * 250 + per[2] * 350 + per[4] * 400)
