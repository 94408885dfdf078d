import pytest
import torch

from progrow_ray.core import ConfigError, build_model, build_optimizer, expand_depth, make_config
from progrow_ray.core.models import GPT, GPTConfig

from .conftest import batch, tiny


def test_gpt2_sizes_from_the_paper():
    with torch.device("meta"):
        zero = GPT(GPTConfig(n_layer=0))
        full = GPT(GPTConfig(n_layer=12))
    assert round(zero.num_params() / 1e6) == 39  # paper: 0-layer 124M-target = 39M
    assert 123e6 < full.num_params() < 125e6
    assert full.config.n_head == 12 and GPTConfig(n_embd=1024).n_head == 16
    assert zero.lm_head.weight is zero.wte.weight  # tied


def test_zero_layer_gpt_is_embeddings_norm_head():
    model = tiny("gpt", 0)
    assert len(model.blocks) == 0
    x, y = batch("gpt")
    logits, loss = model(x, y)
    assert logits.shape == (*x.shape, 96) and torch.isfinite(loss)
    last, none = model(x)
    assert last.shape == (x.size(0), 1, 96) and none is None


@pytest.mark.parametrize(
    "kind,src,dst",
    [
        ("gpt", 0, 3),
        ("llama", 0, 2),
        ("moe", 0, 2),
        ("resnet", (1, 1, 1, 1), (2, 2, 3, 2)),
    ],
)
def test_every_model_trains_before_and_after_expansion(kind, src, dst):
    model = tiny(kind, src)
    opt = build_optimizer(model, "muon_nsgd", lr=0.02)
    x, y = batch(kind, n=8)

    def run(steps):
        losses = []
        for _ in range(steps):
            loss = model(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    before = run(6)
    assert before[-1] < 0.9 * before[0], before
    expand_depth(model, dst, "random", optimizer=opt)
    after = run(8)
    assert after[-1] < after[0], after
    assert after[-1] < before[-1] * 1.05 or after[-1] < 0.9 * after[0]


def test_moe_aux_losses_are_finite_and_routing_is_spread():
    model = tiny("moe", 2, capacity_factor=2.0)
    x, y = batch("moe", n=8)
    model(x, y)
    metrics = model.router_metrics()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    # Switch aux loss is ~1 when balanced and up to n_experts when collapsed
    assert 0.9 < metrics["moe_aux_loss"] < 2.0
    for layer in model.moe_layers():
        used = (layer.expert_fraction > 0).sum().item()
        assert used == layer.cfg.n_experts, layer.expert_fraction
        assert layer.expert_fraction.max() < 0.5
    logits, loss = model(x, y)
    ce_only = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), y.reshape(-1))
    assert loss.item() == pytest.approx(ce_only.item(), rel=1e-6)  # the reported loss: LM cross-entropy only
    expected = (
        model.config.aux_loss_weight * metrics["moe_aux_loss"]
        + model.config.z_loss_weight * metrics["moe_z_loss"]
    )
    assert model.auxiliary_loss().item() == pytest.approx(expected, rel=1e-4)  # what training adds


def test_moe_capacity_drops_overflow():
    model = tiny("moe", 1, capacity_factor=0.25, n_experts=4, top_k=2)
    layer = model.blocks[0].mlp
    assert layer.capacity(32) == 4  # ceil(0.25 * 32 * 2 / 4)
    x, y = batch("moe", n=1)
    _, loss = model(x, y)
    assert torch.isfinite(loss)


def test_llama_uses_grouped_query_attention_and_rope():
    model = tiny("llama", 1)
    attn = model.layers[0].attention
    assert attn.wk.weight.shape[0] == 2 * 16 and attn.wq.weight.shape[0] == 64
    x, y = batch("llama", n=2)
    shifted = torch.roll(x, 1, dims=1)
    a, _ = model(x, y)
    b, _ = model(shifted, y)
    assert not torch.allclose(a[:, 5], b[:, 6])  # position matters through RoPE


@pytest.mark.parametrize(
    "kind,fields,match",
    [
        ("gpt", dict(n_layer=-1), "n_layer"),
        ("gpt", dict(n_embd=100), "head_dim"),
        ("gpt", dict(dropout=1.5), "dropout"),
        ("gpt", dict(n_layers=3), "unknown model field"),
        ("moe", dict(top_k=9), "top_k"),
        ("llama", dict(n_kv_head=5), "n_kv_head"),
        ("resnet", dict(blocks=(1, 1, 1)), "model.blocks"),
        ("resnet", dict(stem="tiny"), "model.stem"),
        ("vit", {}, "model.kind"),
    ],
)
def test_bad_model_configs(kind, fields, match):
    with pytest.raises(ConfigError, match=match):
        make_config(kind, **fields)


def test_sequence_longer_than_block_size():
    model = build_model("gpt", n_layer=0, vocab_size=10, block_size=8, n_embd=32, head_dim=16)
    with pytest.raises(ConfigError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
