import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from progrow_ray.core import ConfigError
from progrow_ray.engine.config import load_run_config
from progrow_ray.orchestration.config import PipelineConfig
from progrow_ray.orchestration.search_plan import choose_prior, plan_search
from progrow_ray.orchestration.tune_tau import align_tau

from ..s3 import make_bucket

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny.yaml")


def load(*overrides):
    return load_run_config(TINY, list(overrides), cls=PipelineConfig)


def test_presets_load():
    cfg = load()
    assert cfg.ray.workers_large == 2 and cfg.phase2_batch_tokens == 1024
    smoke = load_run_config(ROOT / "jobs" / "smoke.yaml", [], cls=PipelineConfig)
    assert smoke.growth.batch_tokens_after > smoke.train.batch_tokens
    assert smoke.ray.workers_large > smoke.ray.workers_small


@pytest.mark.parametrize(
    "override,match",
    [
        ("ray.workers_large=0", "workers_large"),
        ("ray.workers_large=5", "fewer than the 5 workers"),
        ("tune.search_fraction=0", "search_fraction"),
        ("tune.typo=1", "unknown config key"),
        ("growth.enabled=false", "tune.enabled needs growth.enabled"),
        ("ray.cpus_per_worker=-1", "cpus_per_worker"),
        ("tune.on_no_saving=maybe", "on_no_saving must be 'fixed' or 'expand'"),
        ("tune.min_depth_advantage=-0.1", "min_depth_advantage"),
    ],
)
def test_bad_pipeline_settings(override, match):
    with pytest.raises(ConfigError, match=match):
        load(override)


def test_default_tau_and_decay_agree_and_tau_in_the_decay_is_refused():
    """Defaults follow the paper's Figure 1 recipe (2% warmup, 10% decay, tau = 0.8 T: 0.1 T left to mix);
    a tau at or past the decay's start is refused unless growth.allow_tau_in_decay says it is research."""
    from progrow_ray.engine.config import RunConfig, from_dict

    base = {
        "model": {"kind": "gpt", "n_layer": 2, "n_embd": 64, "head_dim": 16},
        "data": {"seq_len": 32},
        "train": {"total_tokens": 100_000, "batch_tokens": 256, "micro_batch": 8},
    }
    cfg = from_dict(RunConfig, base).validate()
    assert (cfg.schedule.warmup_frac, cfg.schedule.decay_frac, cfg.growth.tau_frac) == (0.02, 0.1, 0.8)
    assert cfg.tau_tokens < cfg.schedule_fn().stable_end_tokens
    at_decay = {**base, "growth": {"tau_frac": 0.9}}
    with pytest.raises(ConfigError, match="not before the decay start.*allow_tau_in_decay"):
        from_dict(RunConfig, at_decay).validate()
    research = {**base, "growth": {"tau_frac": 0.9, "allow_tau_in_decay": True}}
    assert from_dict(RunConfig, research).validate().tau_tokens == 90_000
    with pytest.raises(ConfigError, match="muon_scale"):
        from_dict(RunConfig, {**base, "optimizer": {"muon_scale": "kaiming"}}).validate()


def test_tau_aligns_to_both_batches():
    tau = align_tau(136_806, 2048, 8192, 196_608)
    assert tau == 131_072 and (196_608 - tau) % 8192 == 0 and tau % 2048 == 0


def preset(name, *overrides):
    return load_run_config(ROOT / "jobs" / name, list(overrides), cls=PipelineConfig)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_preset_s_search_plan_fits_its_budget_for_any_t_mix(name):
    cfg = preset(name)
    plan = plan_search(cfg, choose_prior(cfg))
    assert plan.fits, plan.lines()
    b = cfg.train.batch_tokens
    assert plan.expand_at % b == 0 and plan.cap % b == 0 and plan.expand_at < plan.cap
    assert plan.expand_at >= cfg.schedule_fn().warmup_tokens > plan.expand_at - b  # right after warmup
    if (
        not cfg.tune.max_search_tokens
    ):  # 1.5x the prior after the expansion, unless the stable phase ends first
        wanted = plan.expand_at + 1.5 * plan.prior.tokens
        assert plan.cap >= min(wanted, cfg.schedule_fn().stable_end_tokens - b)
    # the fraction is held whatever τ the search picks: recompute it independently at a few t_mix
    small, large = cfg.flops_per_unit()
    probe = replace(cfg, model={**cfg.model, **plan.probe_model})
    ps, pl = probe.flops_per_unit()
    total, stable = cfg.train.total_tokens, cfg.schedule_fn().stable_end_tokens
    for t_mix in (0, plan.prior.tokens // 4, plan.prior.tokens, plan.cap - plan.expand_at):
        stop = min(plan.cap, plan.expand_at + t_mix + plan.window)
        search = pl * stop + (ps * plan.expand_at + pl * (stop - plan.expand_at)) + ps * stop
        tau = stable - t_mix * (1 + cfg.tune.safety)
        main = small * tau + large * (total - tau) if tau > cfg.schedule_fn().warmup_tokens else large * total
        assert search / main <= plan.budget * 1.01, (t_mix, search / main)


def test_the_probe_width_is_the_widest_that_fits_and_a_search_that_cannot_fit_is_refused():
    cfg = preset("gpt2-124m.yaml")
    plan = plan_search(cfg, choose_prior(cfg))
    assert plan.width_auto and plan.width % 64 == 0 and plan.prior.source.startswith("paper prior")
    wider = plan_search(replace(cfg, tune=replace(cfg.tune, min_probe_width=plan.width + 64)), plan.prior)
    assert not wider.fits  # one head wider would not fit: the plan took the widest
    # a prior 2x the paper's on a 1% budget cannot fit even one head wide: refused with the numbers
    cfg2 = preset("gpt2-124m.yaml", "tune.t_mix_prior_tokens=32000000000", "tune.search_fraction=0.01")
    big = plan_search(cfg2, choose_prior(cfg2))
    assert not big.fits and big.prior.source == "tune.t_mix_prior_tokens" and big.width == 64
    assert (
        big.cap == int(cfg2.schedule_fn().stable_end_tokens) // 65536 * 65536
    )  # no further than the stable phase
    assert "does not fit its budget" in big.refusal() and "tune.search_fraction=1.0%" in big.refusal()
    # the user raising the budget lets it run
    assert plan_search(replace(cfg2, tune=replace(cfg2.tune, search_fraction=0.1)), big.prior).fits


@pytest.mark.cluster
def test_missing_bucket_fails_before_training(s3_endpoint, tmp_path):  # noqa: F811
    make_bucket("exists")
    p = subprocess.run(
        [sys.executable, "-m", "progrow_ray.pipeline", "--config", str(TINY), "--out", "s3://missing/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "error: out s3://missing/x: S3 bucket 'missing' does not exist (or is not visible "
        "with these credentials); create it or point `out` elsewhere"
    )
    assert "Ray" not in p.stdout


def test_no_saving_policy_trains_fixed_size_unless_told_to_expand():
    from progrow_ray.orchestration.records import SearchResult
    from progrow_ray.orchestration.stages import apply_no_saving_policy

    fixed = SearchResult(
        t_mix_tokens=None,
        expand=False,
        tau_tokens=0,
        verdict="no saving at this horizon: x; train fixed-size",
    )
    for policy, expect in (("fixed", False), ("expand", True)):
        out = apply_no_saving_policy(load(f"tune.on_no_saving={policy}"), fixed, lambda _: None)
        assert out.expand is expect
        if expect:  # at the configured tau (0.5 x 12288), aligned to both batches, and the verdict says so
            assert out.tau_tokens == 6144 and out.verdict_expand is False
            assert "tune.on_no_saving=expand" in out.verdict and out.verdict.startswith(fixed.verdict)
        else:
            assert out == fixed
    mixed = SearchResult(t_mix_tokens=1024, expand=True, tau_tokens=4096, verdict="expand at tau = 4,096")
    # a real verdict is never overridden
    assert apply_no_saving_policy(load("tune.on_no_saving=expand"), mixed, lambda _: None) == mixed


def test_standby_handoff_round_trip_and_abort(tmp_path):
    import threading
    import time

    from progrow_ray.orchestration.standby import Handoff

    handoff = Handoff(str(tmp_path / "h" / "handoff.json"))
    assert handoff.read() is None
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("ckpt", handoff.wait(timeout_s=60, poll_s=0.01)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # waiting: nothing handed over yet
    handoff.give(str(tmp_path / "ckpt"))
    t.join(timeout=10)
    assert got["ckpt"] == str(tmp_path / "ckpt")
    handoff.abort("phase 1 failed: RuntimeError")
    with pytest.raises(RuntimeError, match="phase 1 failed"):
        handoff.wait(timeout_s=60, poll_s=0.01)
    # a driver that never hands over does not hold the standby workers forever
    with pytest.raises(TimeoutError, match="ray.handoff_timeout_s=0.05"):
        Handoff(str(tmp_path / "never.json")).wait(timeout_s=0.05, poll_s=0.01)


def test_standby_only_where_both_phases_fit_and_a_local_cluster_refuses_a_minimum_it_cannot_hold():
    import ray

    from progrow_ray.orchestration.cluster import check_capacity, placeable_workers, standby_fits

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own cluster, never a running one
    try:
        assert placeable_workers(1.0, gpu=False) == 2 and placeable_workers(0.5, gpu=False) == 4
        assert placeable_workers(1.0, gpu=True) == 0
        assert not standby_fits(load())  # 1 + 2 workers > 2 CPUs: the pre-warm instead
        assert standby_fits(load("ray.workers_large=1"))
        check_capacity(load(), local=True)  # each phase alone fits
        check_capacity(load("ray.workers_large=[2,3]"), local=True)  # its minimum fits
        with pytest.raises(ConfigError, match=r"ray.workers_large=3-4 needs 3 worker\(s\) .* holds 2"):
            check_capacity(load("ray.workers_large=[3,4]"), local=True)
    finally:
        ray.shutdown()


def test_an_autoscalers_maximum_counts_for_standby_and_a_minimum_beyond_it_fails_at_once():
    """Autoscaler v2 publishes its node groups to the GCS (what KubeRay's autoscaler writes): standby needs
    room at the maximum, not now; a phase minimum beyond the maximum is refused without waiting."""
    import time

    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    from progrow_ray.orchestration.cluster import (
        CapacityError,
        autoscale_workers,
        standby_fits,
        wait_for_capacity,
    )

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert autoscale_workers(1.0, gpu=False) is None  # no autoscaler
        config = autoscaler_pb2.ClusterConfig()
        group = config.node_group_configs.add()
        group.name, group.max_count = "gpu-h100", 3
        group.resources.update({"CPU": 8, "GPU": 1})
        _internal_kv_put(
            ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
            config.SerializeToString(),
            overwrite=True,
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
        )
        assert autoscale_workers(8.0, gpu=True) == 3 and autoscale_workers(4.0, gpu=False) == 6
        cfg = load("ray.use_gpu=true", "ray.cpus_per_worker=8")
        assert standby_fits(cfg)  # 1 + 2 GPU workers once the autoscaler adds nodes; none now
        started = time.monotonic()
        with pytest.raises(CapacityError, match=r"holds 0 and can autoscale to 3. Raise the autoscaler"):
            wait_for_capacity(
                load(
                    "ray.use_gpu=true",
                    "ray.cpus_per_worker=8",
                    "ray.workers_large=[4,4]",
                    "baseline.enabled=false",
                ),
                "phase2",
                load("ray.workers_large=4").ray.large,
            )
        assert time.monotonic() - started < 5  # no waiting for capacity that cannot come
    finally:
        ray.shutdown()


def test_no_saving_reason_is_one_line_with_the_numbers():
    from progrow_ray.orchestration.records import ProbeTrial, SearchResult
    from progrow_ray.report import no_saving_reason

    cfg = load()
    probe = ProbeTrial("fixed", 3072, 1.0, [])
    searched = SearchResult(
        t_mix_tokens=None,
        tau_tokens=6144,
        verdict="x",
        expand=True,
        verdict_expand=False,
        trials=(probe,),
        cap_tokens=3072,
        mix={"depth_advantage_rel": 0.0146},
    )
    why = no_saving_reason(cfg, searched)
    small = cfg.source_model_config().train_flops_per_unit(seq_len=32)
    large = cfg.target_model_config().train_flops_per_unit(seq_len=32)
    assert f"the layers are {1 - small / large:.0%} of this model's training FLOPs" in why
    assert (
        "50,304-token head" in why
        and "by only 1.5%" in why
        and "not 12,288 tokens" in why
        and "\n" not in why
    )
    real = SearchResult(t_mix_tokens=1024, tau_tokens=6144, verdict="x", expand=True, trials=(probe,))
    assert no_saving_reason(cfg, real) is None  # a real τ
    assert no_saving_reason(cfg, SearchResult(None, 6144, True, "x")) is None  # no search ran


def test_phase_results_round_trip_and_older_state_files_still_load():
    from progrow_ray.orchestration.records import PhaseResult, TrackedRun

    phase = PhaseResult(
        name="phase1",
        depth=[1, 1, 1, 1],
        workers=1,
        global_batch_tokens=32,
        tokens=512,
        tokens_end=512,
        flops=1.5e9,
        flops_end=1.5e9,
        final_train_loss=2.1,
        final_val_loss=None,
        checkpoint_uri="/x/ckpt",
        fit_s=3.0,
        end_time=1.0,
        history=[{"event": "train", "tokens": 32}],
        mlflow=TrackedRun({"lr": 0.01}, {"progrow.phase": "phase1"}, "abc"),
    )
    assert PhaseResult.from_json(phase.to_json()) == phase
    old = {
        k: v for k, v in phase.to_json().items() if k != "mlflow"
    }  # before phases kept their MLflow params
    old["checkpoint_path"] = "/x/ckpt"  # a key of an older version
    loaded = PhaseResult.from_json(old)
    assert loaded.mlflow == TrackedRun({}, {}, None) and loaded.checkpoint_uri == "/x/ckpt"
