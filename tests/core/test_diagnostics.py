import pytest

from progrow_ray.core import expand_depth
from progrow_ray.core.diagnostics import mup_violations, spectral_report

from .conftest import tiny


def test_spectral_rows_and_targets():
    model = tiny("gpt", 1, n_embd=128, head_dim=32)
    rows = {r.name: r for r in spectral_report(model)}
    fc = rows["blocks.0.mlp.c_fc.weight"]
    assert (fc.fan_in, fc.fan_out) == (128, 512) and fc.target == pytest.approx(2.0)
    wte = rows["wte.weight"]
    assert (wte.fan_in, wte.fan_out) == (96, 128)  # one-hot vocab -> d
    assert "lm_head.weight" not in rows  # tied to wte: reported once
    # N(0, 0.02) init of a 512x128 matrix: sigma ~ 0.02 (sqrt(512) + sqrt(128)) = 0.68
    assert fc.spectral_norm == pytest.approx(0.02 * (512 ** 0.5 + 128 ** 0.5), rel=0.15)


@pytest.mark.parametrize("method,violates", [("random", False), ("copying", False), ("zero", True), ("copying_zero", True)])
def test_table1_mup_condition_after_expansion(method, violates):
    model = tiny("gpt", 1, n_embd=128, head_dim=32)
    expand_depth(model, 3, method)
    new = spectral_report(model, prefix="blocks.2.")
    assert new
    assert bool(mup_violations(new)) == violates
    if method == "zero":
        assert all(r.spectral_norm == 0 for r in new)
    if method == "copying_zero":  # copied matrices are intact; only the norm sub-layers are zero
        assert all((r.spectral_norm == 0) == (".ln_" in r.name) for r in new)
        assert {r.name for r in mup_violations(new)} == {"blocks.2.ln_1.weight", "blocks.2.ln_2.weight"}
        assert not mup_violations(spectral_report(model, prefix="blocks.0."))


def test_moe_experts_and_conv_kernels():
    moe = {r.name: r for r in spectral_report(tiny("moe", 1))}
    w = moe["blocks.0.mlp.w_fc"]
    assert (w.fan_in, w.fan_out) == (64, 256)
    conv = {r.name: r for r in spectral_report(tiny("resnet", (1, 1, 1, 1)))}
    c = conv["stages.0.first.conv2.weight"]
    assert (c.fan_in, c.fan_out) == (4 * 9, 4)
