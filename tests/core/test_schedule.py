import pytest

from progrow_ray.core import WSD, ConfigError, Cosine, make_schedule, step_lr


def test_wsd_values_at_boundaries():
    s = WSD(total_tokens=1_000_000, warmup_frac=0.02, decay_frac=0.2)
    assert s(0) == 0.0
    assert s(10_000) == pytest.approx(0.5)  # halfway through warmup
    assert s(20_000) == 1.0  # end of warmup
    assert s(500_000) == 1.0  # stable
    assert s.stable_end_tokens == 800_000 and s(800_000) == 1.0
    assert s(900_000) == pytest.approx(0.5)  # linear decay, halfway
    assert s(1_000_000) == 0.0
    assert s(2_000_000) == 0.0  # clamped past the end


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("1-sqrt", 1 - 0.5**0.5), ("cosine", 0.5)])
def test_wsd_decay_shapes_and_floor(shape, mid):
    s = WSD(1000, warmup_frac=0.0, decay_frac=0.5, decay_shape=shape, final_frac=0.1)
    assert s(500) == 1.0
    assert s(750) == pytest.approx(0.1 + 0.9 * mid)
    assert s(1000) == pytest.approx(0.1)
    q = WSD(1000, warmup_frac=0.0, decay_frac=0.5, decay_shape=shape)
    assert q(600) > q(700) > q(800) > q(900)  # monotone decay


def test_cosine_with_warmup():
    s = Cosine(total_tokens=1000, warmup_frac=0.1)
    assert s(0) == 0.0 and s(100) == pytest.approx(1.0)
    assert s(550) == pytest.approx(0.5)
    assert s(1000) == pytest.approx(0.0, abs=1e-12)
    assert s.stable_end_tokens == s.warmup_tokens


def test_schedule_position_survives_a_batch_change():
    """Same tokens => same LR, whatever batch got there: 4 steps of 1k tokens == 1 step of 4k."""
    s = WSD(100_000, warmup_frac=0.02, decay_frac=0.2)
    tokens_small = 0
    for _ in range(50):
        tokens_small += 1000
    tokens_large = 0
    for _ in range(50 // 4):
        tokens_large += 4000
    tokens_large += 2000  # 12 big steps + half a big step of tokens
    assert tokens_large == tokens_small
    assert s(tokens_small) == s(tokens_large)
    # step_lr evaluates at the middle of the step's token interval
    assert step_lr(s, 0.01, 0, 1000) == pytest.approx(0.01 * 500 / 2000)
    assert step_lr(s, 0.01, 99_000, 1000) == pytest.approx(0.01 * 500 / 20_000)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_tokens=0), "total tokens"),
        (dict(total_tokens=10, warmup_frac=0.9, decay_frac=0.2), "warmup_frac \\+ decay_frac"),
        (dict(total_tokens=10, decay_shape="exp"), "decay_shape"),
        (dict(total_tokens=10, decay_frac=0.0), "decay_frac"),
    ],
)
def test_bad_wsd_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WSD(**kwargs)
    with pytest.raises(ConfigError, match="schedule.name"):
        make_schedule("step", 100)
