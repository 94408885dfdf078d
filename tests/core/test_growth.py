import copy

import pytest
import torch

from progrow_ray.core import ConfigError, build_optimizer, expand_depth, layout
from progrow_ray.core.growth import METHODS

from .conftest import batch, tiny

SOURCES = {"gpt": (0, 4), "llama": (0, 3), "moe": (0, 3), "resnet": ((1, 1, 1, 1), (2, 3, 3, 2))}
ONE_LAYER = {"gpt": (1, 4), "llama": (1, 3), "moe": (1, 3), "resnet": ((2, 2, 2, 2), (3, 4, 4, 3))}


def logits_of(model, kind, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0] if kind == "resnet" else model(x, x)[0]


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize(
    "method,sources", [("zero", SOURCES), ("zero", ONE_LAYER), ("copying_zero", ONE_LAYER)]
)
def test_function_preserving_methods_keep_logits(kind, method, sources):
    src, dst = sources[kind]
    model = tiny(kind, src)
    x, _ = batch(kind)
    before = logits_of(model, kind, x)
    expand_depth(model, dst, method)
    after = logits_of(model, kind, x)
    assert model.group_depths() == model.group_depths_for(dst)
    assert torch.allclose(before, after, atol=1e-6, rtol=0), (before - after).abs().max()


@pytest.mark.parametrize("kind", ["gpt", "moe"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", ["zero", "copying_zero"])
def test_function_preserving_with_and_without_linear_biases(kind, bias, method):
    """copying_zero zeroes the copies' norms and biases: with model.bias=true the copies' biases alone
    used to change the logits by 0.2-1."""
    model = tiny(kind, 1, bias=bias)
    with torch.no_grad():  # non-zero biases everywhere, as a trained model has
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    x, _ = batch(kind)
    before = logits_of(model, kind, x)
    expand_depth(model, 3, method)
    after = logits_of(model, kind, x)
    assert torch.allclose(before, after, atol=1e-5, rtol=0), (before - after).abs().max()
    if method == "copying_zero" and bias:  # the weight matrices are still copies
        assert torch.equal(model.blocks[1].attn.c_attn.weight, model.blocks[0].attn.c_attn.weight)


def test_zero_expansion_keeps_an_moes_reported_loss():
    """The reported loss is the LM cross-entropy: a zero expansion of a 0-layer MoE, which preserves the
    function, keeps it exactly (router losses of the new layers used to add ~0.0145)."""
    model = tiny("moe", 0)
    x, y = batch("moe")
    model.eval()
    with torch.no_grad():
        before = model(x, y)[1].item()
        expand_depth(model, 2, "zero")
        after = model(x, y)[1].item()
    assert after == pytest.approx(before, abs=1e-6)
    assert model.auxiliary_loss().item() > 0  # the router losses exist, as their own term


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize(
    "method,sources", [("random", SOURCES), ("random", ONE_LAYER), ("copying", ONE_LAYER)]
)
def test_mup_methods_change_the_function(kind, method, sources):
    src, dst = sources[kind]
    model = tiny(kind, src)
    x, _ = batch(kind)
    before = logits_of(model, kind, x)
    expand_depth(model, dst, method)
    after = logits_of(model, kind, x)
    assert (before - after).abs().max() > 1e-3


def test_layer_orders_match_the_paper():
    def order(method, source, target):
        return [o.source + 1 for o in layout(method, source, target)]

    assert order("copying_last", 3, 6) == [1, 2, 3, 3, 3, 3]
    assert order("copying_stack", 3, 6) == [1, 2, 3, 1, 2, 3]
    assert order("copying_inter", 3, 6) == [1, 1, 2, 2, 3, 3]
    assert order("copying_inter", 3, 7) == [1, 1, 1, 2, 2, 3, 3]
    for m in ("copying", "copying_last", "copying_stack", "copying_inter"):  # one layer: all the same
        assert order(m, 1, 4) == [1, 1, 1, 1]
    kinds = [o.kind for o in layout("copying_inter", 2, 4)]
    assert kinds == ["kept", "copied", "kept", "copied"]
    assert [o.kind for o in layout("random", 0, 2)] == ["random", "random"]


def test_model_layers_follow_the_layout():
    model = tiny("gpt", 3)
    originals = list(model.blocks)
    record = expand_depth(model, 6, "copying_inter")
    assert [model.blocks[i] is originals[j] for i, j in [(0, 0), (2, 1), (4, 2)]] == [True] * 3
    for i, src in [(1, 0), (3, 1), (5, 2)]:
        assert model.blocks[i] is not originals[src]
        assert torch.equal(model.blocks[i].attn.c_attn.weight, originals[src].attn.c_attn.weight)
    assert [(o.kind, o.source) for o in record.origins["blocks"]][:2] == [("kept", 0), ("copied", 0)]
    assert model.config.n_layer == 6


@pytest.mark.parametrize("method", [m for m in METHODS if m.startswith("copying")])
def test_copying_from_zero_layers_is_invalid(method):
    model = tiny("gpt", 0)
    with pytest.raises(ConfigError, match="0-layer"):
        expand_depth(model, 4, method)
    assert model.config.n_layer == 0 and len(model.blocks) == 0


def test_invalid_requests_raise_and_change_nothing():
    model = tiny("gpt", 3)
    with pytest.raises(ConfigError, match="ambiguous"):
        expand_depth(model, 6, "copying")
    with pytest.raises(ConfigError, match="below the source"):
        expand_depth(model, 2, "random")
    with pytest.raises(ConfigError, match="growth.method"):
        expand_depth(model, 6, "grow_sideways")
    resnet = tiny("resnet", (1, 1, 1, 1))
    with pytest.raises(ConfigError, match="0-layer"):  # per stage: nothing to copy in any stage
        expand_depth(resnet, (2, 2, 2, 2), "copying")
    with pytest.raises(ConfigError, match="4 blocks-per-stage"):
        expand_depth(resnet, 4, "random")
    assert len(model.blocks) == 3 and resnet.config.blocks == (1, 1, 1, 1)


def test_moe_interleaved_copy_into_dense_slot_is_refused_before_any_change():
    model = tiny("moe", 1, moe_every=2)
    with pytest.raises(ConfigError, match="use growth.method='random'"):
        expand_depth(model, 3, "copying")
    assert len(model.blocks) == 1
    expand_depth(model, 3, "random")
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MoEMLP", "MLP", "MoEMLP"]


def test_moe_copies_experts_and_router():
    model = tiny("moe", 1)
    expand_depth(model, 3, "copying")
    src, copy_ = model.blocks[0].mlp, model.blocks[2].mlp
    assert copy_ is not src
    for name in ("w_fc", "w_proj"):
        assert torch.equal(getattr(src, name), getattr(copy_, name))
    assert torch.equal(src.router.weight, copy_.router.weight)


def test_resnet_expands_each_stage():
    model = tiny("resnet", (2, 2, 2, 2))
    record = expand_depth(model, (3, 4, 6, 3), "copying")
    assert model.config.blocks == (3, 4, 6, 3)
    assert record.target_depths == {"stage1": 2, "stage2": 3, "stage3": 5, "stage4": 2}
    assert [len(s.rest) for s in model.stages] == [2, 3, 5, 2]
    assert model.config.conventional_depth == 50 and model.config.depth == [3, 4, 6, 3]


def test_random_new_layers_use_target_depth_residual_init():
    model = tiny("gpt", 0, n_embd=256, head_dim=64)
    expand_depth(model, 8, "random", generator_seed=0)
    std = model.blocks[5].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    a = tiny("gpt", 0)
    b = copy.deepcopy(a)
    expand_depth(a, 2, "random", generator_seed=7)
    torch.randn(10)  # the global stream moving must not matter
    expand_depth(b, 2, "random", generator_seed=7)
    assert torch.equal(a.blocks[1].mlp.c_fc.weight, b.blocks[1].mlp.c_fc.weight)


def _train_steps(model, opt, kind, steps=3):
    x, y = batch(kind)
    for _ in range(steps):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["muon_nsgd", "adamw"])
def test_optimizer_state_of_old_parameters_survives(family):
    model = tiny("gpt", 1)
    opt = build_optimizer(model, family, lr=1e-2)
    _train_steps(model, opt, "gpt")
    old = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    record = expand_depth(model, 3, "copying", optimizer=opt)
    assert record.new_parameters == 2 * sum(p.numel() for p in model.blocks[0].parameters())
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert set(in_opt) == set(model.parameters()) and len(in_opt) == len(set(in_opt))
    for p, state in old.items():
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v)
    for p in model.blocks[1].parameters():
        assert p not in opt.state  # new layers start fresh
    _train_steps(model, opt, "gpt", 1)
    assert all(p in opt.state for p in model.blocks[2].parameters())


def test_copy_optimizer_state_option_and_layout_matches_fresh_optimizer():
    model = tiny("gpt", 1)
    opt = build_optimizer(model, "muon_nsgd")
    _train_steps(model, opt, "gpt")
    expand_depth(model, 3, "copying", optimizer=opt, copy_optimizer_state=True)
    src = model.blocks[0].attn.c_attn.weight
    for i in (1, 2):
        p = model.blocks[i].attn.c_attn.weight
        assert torch.equal(opt.state[p]["momentum_buffer"], opt.state[src]["momentum_buffer"])
        assert opt.state[p]["momentum_buffer"] is not opt.state[src]["momentum_buffer"]
    fresh = build_optimizer(model, "muon_nsgd")
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in fresh.param_groups
    ]


@pytest.mark.slow
def test_expanded_model_runs_under_torch_compile():
    model = tiny("gpt", 0)
    x, y = batch("gpt")
    compiled = torch.compile(model)
    compiled(x, y)[1].backward()
    expand_depth(compiled, 2, "random")  # expands the wrapped module
    assert model.config.n_layer == 2
    model.eval()
    with torch.no_grad():
        eager = model(x, y)[0]
        got = torch.compile(model)(x, y)[0]
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
