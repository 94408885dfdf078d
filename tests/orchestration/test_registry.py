"""The mixing-time registry and its CLI, without Ray: fingerprints, matching, transfer, outcomes."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from progrow_ray.core import ConfigError
from progrow_ray.engine.config import load_run_config
from progrow_ray.orchestration.config import PipelineConfig
from progrow_ray.orchestration.search_plan import choose_prior
from progrow_ray.orchestration.tmix_registry import Registry, fingerprint, key_of

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny.yaml")


@pytest.fixture(autouse=True)
def _data(prepared):
    global DATA
    DATA = prepared


def load(tmp_path, *overrides):
    sets = [f"data.uri={DATA}", f"tune.registry={tmp_path}/registry", *overrides]
    return load_run_config(TINY, sets, cls=PipelineConfig)


def test_fingerprint_matches_what_t_mix_depends_on_and_not_the_width_or_horizon(tmp_path):
    cfg = load(tmp_path)
    fp = fingerprint(cfg)
    assert fp["family"] == "gpt" and fp["depths"] == [0, 2] and fp["optimizer"]["lr"] == 0.01
    same = [
        "model.n_embd=64",  # width: t_mix transfers across sizes (App. C.1)
        "train.total_tokens=24576",  # horizon: t_mix in the stable phase does not depend on it
        "ray.workers_large=4",
    ]
    for override in same:
        assert key_of(fingerprint(load(tmp_path, override))) == key_of(fp), override
    different = [
        "optimizer.lr=0.02",
        "growth.method=zero",
        "schedule.decay_frac=0.3",
        "train.batch_tokens=1024",
        "model.n_layer=4",
        "tune.probe_model={n_layer: 4}",  # the probes' depth pair is what was measured
        "tune.rel_tol=0.05",  # what "mixed" means
        "tune.smoothing=0.9",
        "tune.lr_search.enabled=true",  # then the LR the probes use is the search's
    ]
    for override in different:
        assert key_of(fingerprint(load(tmp_path, override))) != key_of(fp), override
    with pytest.raises(ConfigError, match="not prepared"):  # which corpus it is must be known
        fingerprint(load(tmp_path, f"data.uri={tmp_path}/nothing"))


def test_lookup_reuses_the_newest_mixed_value_and_marks_a_narrower_one_transferred(tmp_path):
    cfg = load(tmp_path)
    reg = Registry(cfg.tune.registry)
    fp = fingerprint(cfg)
    assert reg.lookup(fp, 64) is None and reg.entries() == []
    reg.record(
        fp, t_mix_tokens=None, cap_tokens=3072, expand_at_tokens=1024, probe_width=32, source="measured"
    )
    assert reg.lookup(fp, 64) is None  # did not mix: nothing to reuse
    key, mid = reg.record(
        fp, t_mix_tokens=2048, probe_width=32, width_field="n_embd", source="measured", run="a"
    )
    hit = reg.lookup(fp, 64)
    assert hit.t_mix_tokens == 2048 and hit.transferred and "transferred to 64" in hit.describe()
    assert not reg.lookup(fp, 32).transferred
    assert reg.lookup(fingerprint(load(tmp_path, "optimizer.lr=0.02")), 64) is None
    # a registry value is the prior of a search that is run anyway (tune.reuse=never)
    unset = replace(cfg, tune=replace(cfg.tune, t_mix_prior_tokens=None))
    assert (
        choose_prior(unset, hit.prior()).tokens == 2048
        and "registry" in choose_prior(unset, hit.prior()).source
    )
    assert choose_prior(unset).source.startswith("paper prior")
    assert choose_prior(cfg, hit.prior()).tokens == 1024  # the config's own prior comes first
    assert reg.record_outcome(key, mid, {"measured_gap_rel": 0.003})
    assert reg.get(key)["measurements"][-1]["outcomes"] == [{"measured_gap_rel": 0.003}]
    assert reg.forget(key, mid) == 1 and reg.lookup(fp, 64) is None and len(reg.entries()) == 1
    assert reg.forget(key) == 1 and reg.entries() == []


def test_tmix_cli_adds_lists_shows_and_forgets(tmp_path):
    def tmix(*args):
        p = subprocess.run(
            [sys.executable, "-m", "progrow_ray.tmix", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return p.returncode, p.stdout + p.stderr

    conf = [
        "--config",
        str(TINY),
        "--set",
        f"data.uri={DATA}",
        "--set",
        f"tune.registry={tmp_path}/r",
    ]
    rc, out = tmix("add", *conf, "--t-mix", "16e3", "--width", "16", "--note", "seeded by hand")
    assert rc == 0 and "t_mix 16,000" in out, out
    key = key_of(fingerprint(load(tmp_path, f"tune.registry={tmp_path}/r")))
    rc, out = tmix("list", *conf)
    assert rc == 0 and key in out and "16,000" in out and "seeded" in out
    rc, out = tmix("show", key, "--registry", f"{tmp_path}/r")
    entry = json.loads(out)
    assert entry["measurements"][0]["note"] == "seeded by hand" and entry["fingerprint"]["family"] == "gpt"
    rc, out = tmix("show", "0123456789ab", "--registry", f"{tmp_path}/r")
    assert rc == 2 and "no registry entry" in out
    rc, out = tmix("forget", key, *conf)
    assert rc == 0 and "forgot 1" in out
    rc, out = tmix("list", "--registry", f"{tmp_path}/r")
    assert "no entries" in out
