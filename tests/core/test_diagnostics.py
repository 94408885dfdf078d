import pytest

from progrow_ray.core import expand_depth
from progrow_ray.core.diagnostics import RATIO_BAND, mup_violations, spectral_report

from .conftest import tiny


def test_spectral_rows_and_targets():
    model = tiny("gpt", 1, n_embd=128, head_dim=32)
    rows = {r.name: r for r in spectral_report(model)}
    fc = rows["blocks.0.mlp.c_fc.weight"]
    assert (fc.fan_in, fc.fan_out) == (128, 512) and fc.target == pytest.approx(2.0)
    wte = rows["wte.weight"]
    assert (wte.fan_in, wte.fan_out, wte.role) == (128, 96, "linear")  # tied: the head d -> vocab
    assert "lm_head.weight" not in rows  # tied to wte: reported once
    wpe = rows["wpe.weight"]
    assert (wpe.fan_in, wpe.fan_out, wpe.role) == (32, 128, "embedding")  # one-hot position -> d
    # N(0, 0.02) init of a 512x128 matrix: sigma ~ 0.02 (sqrt(512) + sqrt(128)) = 0.68
    assert fc.spectral_norm == pytest.approx(0.02 * (512**0.5 + 128**0.5), rel=0.15)


@pytest.mark.parametrize(
    "method,violates", [("random", False), ("copying", False), ("zero", True), ("copying_zero", True)]
)
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


@pytest.mark.parametrize("vocab,d", [(50304, 256), (50304, 768), (1024, 768), (128256, 512)])
def test_normal_embeddings_are_not_flagged(vocab, d):
    """An N(0, 0.02) embedding read on its one-hot inputs (largest token vector, ~0.02 sqrt(d)) against
    sqrt(d / vocab): ratio ~0.02 sqrt(vocab), inside the band for token (50k-128k) and position (1k)
    tables; its spectral norm, 0.02 (sqrt(d) + sqrt(vocab)), called it 40-67x too large."""
    import torch

    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab, d)
    torch.nn.init.normal_(emb.weight, std=0.02)
    (row,) = spectral_report(emb)
    assert (row.fan_in, row.fan_out, row.role) == (vocab, d, "embedding")
    assert row.satisfies_mup and row.ratio == pytest.approx(0.02 * vocab**0.5, rel=0.3), row.ratio
    spectral_ratio = torch.linalg.matrix_norm(emb.weight, ord=2).item() / row.target
    if vocab > 10 * d:  # token tables: what measuring the spectral norm reported
        assert spectral_ratio > 10 and not RATIO_BAND[0] <= spectral_ratio <= RATIO_BAND[1]
