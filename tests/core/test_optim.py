import pytest
import torch
from torch import nn

from progrow_ray.core import ConfigError, MuonNSGD, build_optimizer, newton_schulz
from progrow_ray.core.layouts import MatrixLayout, matrix_layouts
from progrow_ray.core.optim import MUON_SCALES

from .conftest import tiny


def _square_with_spectrum(n: int, condition: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return U @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), n)) @ V.T


# Rectangular Gaussian matrices are well conditioned; a square Gaussian one is not (its smallest
# singular value ~ 1/n, beyond what 5 steps lift), so square inputs get a spectrum spanning 50x.
@pytest.mark.parametrize("shape", [(32, 128), (256, 48), (4, 96, 24), "square"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_singular_values_in_the_quintic_band(shape, dtype):
    if shape == "square":
        G = _square_with_spectrum(64, condition=50.0)
    else:
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = newton_schulz(G, steps=5, dtype=dtype).float()
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Orthogonalisation keeps the singular vectors: the polar factor U V^T of G.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (X * (U @ Vh)).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert cos.min() > 0.98


def test_matrix_layouts_follow_each_weights_logical_fans():
    moe, llama, gpt = tiny("moe", 1), tiny("llama", 1), tiny("gpt", 1)
    lay = matrix_layouts(moe)
    assert lay[moe.blocks[0].mlp.w_fc] == MatrixLayout("experts", 4, 256, 64)  # stored (E, in=64, out=256)
    assert lay[moe.blocks[0].mlp.w_proj] == MatrixLayout("experts", 4, 64, 256)
    assert matrix_layouts(gpt)[gpt.wte.weight] == MatrixLayout(
        "linear", 1, 96, 64
    )  # tied to the head: the head's fans
    assert matrix_layouts(gpt)[gpt.wpe.weight] == MatrixLayout(
        "embedding", 1, 64, 32
    )  # one-hot position -> d
    assert matrix_layouts(llama)[llama.tok_embeddings.weight] == MatrixLayout("embedding", 1, 64, 96)
    conv = nn.Conv2d(8, 6, 3, groups=2)
    assert matrix_layouts(conv)[conv.weight] == MatrixLayout("conv", 2, 3, 4 * 9)
    for p, layout in [
        (moe.blocks[0].mlp.w_fc, lay[moe.blocks[0].mlp.w_fc]),
        (conv.weight, matrix_layouts(conv)[conv.weight]),
        (llama.tok_embeddings.weight, MatrixLayout("embedding", 1, 64, 96)),
    ]:
        m = layout.matrices(p)
        assert m.shape == (layout.batch, layout.fan_out, m.size(-1))
        assert torch.equal(layout.stored(m, p), p)
    # the expert matrices are the maps x -> x @ W_e: (out, in) = W_e^T
    assert torch.equal(
        lay[moe.blocks[0].mlp.w_fc].matrices(moe.blocks[0].mlp.w_fc)[1], moe.blocks[0].mlp.w_fc[1].T
    )


def _one_step_update(opt, params, grads):
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [(before_p - p.detach()) for p, before_p in zip(params, before)]  # = lr * update (no decay)


def _spectral(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(t, ord=2)


def test_moe_expert_update_equals_the_equivalent_dense_layers():
    """An expert is a dense layer per expert: the same gradient (transposed, as it is stored) must give
    the same update; update-norm / lr 2 x ~1 for the up-projection (fan_out / fan_in = 4), ~1 down."""
    torch.manual_seed(0)
    moe = tiny("moe", 1, n_experts=1, top_k=1)
    mlp = moe.blocks[0].mlp
    up, down = nn.Linear(64, 256, bias=False), nn.Linear(256, 64, bias=False)
    dense = nn.ModuleDict({"up": up, "down": down})
    g_up, g_down = torch.randn(256, 64), torch.randn(64, 256)
    kw = dict(lr=1.0, weight_decay=0.0, momentum=0.0)
    du, dd = _one_step_update(
        build_optimizer(dense, "muon_nsgd", **kw), [up.weight, down.weight], [g_up, g_down]
    )
    eu, ed = _one_step_update(
        build_optimizer(moe, "muon_nsgd", **kw),
        [mlp.w_fc, mlp.w_proj],
        [g_up.T.unsqueeze(0), g_down.T.unsqueeze(0)],
    )
    torch.testing.assert_close(eu[0].T, du, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ed[0].T, dd, atol=1e-6, rtol=1e-5)
    assert 2 * 0.6 < _spectral(du) < 2 * 1.25 and 0.6 < _spectral(dd) < 1.25
    # several experts: each one's update norm is the dense layer's
    moe4 = tiny("moe", 1, n_experts=4)
    mlp4 = moe4.blocks[0].mlp
    eu4, ed4 = _one_step_update(
        build_optimizer(moe4, "muon_nsgd", **kw),
        [mlp4.w_fc, mlp4.w_proj],
        [torch.randn(4, 64, 256), torch.randn(4, 256, 64)],
    )
    assert torch.allclose(_spectral(eu4), _spectral(du), rtol=0.15) and torch.allclose(
        _spectral(ed4), _spectral(dd), rtol=0.15
    )


def test_untied_embedding_update_follows_the_one_hot_rule():
    """Llama's (V, d) input embedding: no sqrt(V / d) factor (it was 4x here, 8.09x at V=50304, d=768);
    its (V, d) output head keeps the factor as the Linear it is."""
    llama = tiny("llama", 0, vocab_size=1024)
    emb, head = llama.tok_embeddings.weight, llama.output.weight
    d_emb, d_head = _one_step_update(
        build_optimizer(llama, "muon_nsgd", lr=1.0, weight_decay=0.0, momentum=0.0),
        [emb, head],
        [torch.randn(1024, 64), torch.randn(1024, 64)],
    )
    assert 0.6 < _spectral(d_emb) < 1.25
    assert 4 * 0.6 < _spectral(d_head) < 4 * 1.25  # sqrt(1024 / 64)


@pytest.mark.parametrize("convention", MUON_SCALES)
def test_muon_scale_conventions(convention):
    torch.manual_seed(0)
    gpt = tiny("gpt", 1)
    fc, proj, wpe = gpt.blocks[0].mlp.c_fc.weight, gpt.blocks[0].mlp.c_proj.weight, gpt.wpe.weight
    opt = build_optimizer(gpt, "muon_nsgd", lr=1.0, weight_decay=0.0, momentum=0.0, muon_scale=convention)
    d_fc, d_proj, d_wpe = _one_step_update(
        opt, [fc, proj, wpe], [torch.randn_like(fc), torch.randn_like(proj), torch.randn_like(wpe)]
    )
    # wpe: 32 positions -> d = 64, a 64 x 32 map
    expected = {"jordan": (2.0, 1.0, 2**0.5), "none": (1.0, 1.0, 1.0), "spectral": (2.0, 0.5, 2**0.5)}[
        convention
    ]
    for delta, factor in zip((d_fc, d_proj, d_wpe), expected):
        s = torch.linalg.svdvals(delta)
        s = s[: min(delta.shape)]
        assert factor * 0.6 < s.min() and s.max() < factor * 1.25, (convention, factor, s.min(), s.max())
    with pytest.raises(ConfigError, match="muon_scale"):
        build_optimizer(gpt, "muon_nsgd", muon_scale="kaiming")


def test_grouped_convolution_is_orthogonalised_per_group():
    conv = nn.Conv2d(8, 8, 3, groups=2, bias=False)
    (delta,) = _one_step_update(
        build_optimizer(conv, "muon_nsgd", lr=1.0, weight_decay=0.0, momentum=0.0),
        [conv.weight],
        [torch.randn(8, 4, 3, 3)],
    )
    for g in range(2):  # each group's (4, 36) matrix is semi-orthogonal on its own: 4 singular values ~1
        s = torch.linalg.svdvals(delta[4 * g : 4 * (g + 1)].reshape(4, -1))
        assert 0.6 < s.min() and s.max() < 1.25


def test_nsgd_uses_the_papers_momentum_and_nesterov_on_request():
    """W <- W - lr m_t / ||m_t||, m_t = beta m_{t-1} + (1 - beta) g_t (paper App. B); Nesterov reads
    g_t + beta (m_t - g_t) instead and lands elsewhere."""
    torch.manual_seed(0)
    grads = [torch.randn(9) for _ in range(3)]
    ends = {}
    for nesterov in (False, True):
        p = nn.Parameter(torch.zeros(9))
        opt = MuonNSGD([p], lr=0.1, momentum=0.9, weight_decay=0.0, nsgd_nesterov=nesterov)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        ends[nesterov] = p.detach().clone()
    m, w = torch.zeros(9), torch.zeros(9)
    for g in grads:
        m = 0.9 * m + 0.1 * g
        w = w - 0.1 * m / m.norm()
    torch.testing.assert_close(ends[False], w, atol=1e-6, rtol=1e-6)
    assert (ends[True] - w).abs().max() > 1e-3
    gpt = tiny("gpt", 1)
    kinds = {g["kind"]: g["nesterov"] for g in build_optimizer(gpt, "muon_nsgd").param_groups}
    assert kinds == {"muon": True, "nsgd": False}  # Muon keeps Jordan et al.'s Nesterov


def test_resume_and_copies_keep_the_configured_form():
    """A checkpoint's param groups bring momenta, not the momentum form or Muon scale: a run resumed
    under a config that changed them (e.g. from before NSGD followed the paper) uses the config's."""
    import copy

    gpt = tiny("gpt", 1)
    old = build_optimizer(gpt, "muon_nsgd", nsgd_nesterov=True, muon_scale="spectral")
    for p in gpt.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    new = build_optimizer(gpt, "muon_nsgd")
    new.load_state_dict(old.state_dict())
    assert {g["kind"]: (g["nesterov"], g["muon_scale"]) for g in new.param_groups} == {
        "muon": (True, "jordan"),
        "nsgd": (False, "jordan"),
    }
    assert torch.equal(
        new.state[gpt.wte.weight]["momentum_buffer"], old.state[gpt.wte.weight]["momentum_buffer"]
    )
    twin = copy.deepcopy(new)  # torch's pickling keeps defaults / state / groups only
    twin.step()


def test_nsgd_update_has_norm_lr():
    p = nn.Parameter(torch.randn(37))
    opt = MuonNSGD([{"params": [p], "kind": "nsgd"}], lr=0.03, weight_decay=0.0)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(37)
        opt.step()
        assert (p.detach() - before).norm().item() == pytest.approx(0.03, rel=1e-5)


def test_weight_decay_is_decoupled():
    p = nn.Parameter(torch.ones(5))
    opt = MuonNSGD([{"params": [p], "kind": "nsgd"}], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(5)  # zero gradient: only decay acts
    opt.step()
    assert torch.allclose(p.detach(), torch.full((5,), 1 - 0.1 * 0.5))


def test_muon_matches_torch_optim_muon_on_matrices():
    torch.manual_seed(0)
    w0 = torch.randn(48, 32)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_ours = MuonNSGD(
        [{"params": [ours], "kind": "muon"}], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16
    )
    opt_ref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(4):
        g = torch.randn(48, 32)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_muon_update_scale_and_orthogonality():
    p = nn.Parameter(torch.zeros(128, 32))  # rows > cols: scaled by sqrt(128/32) = 2
    opt = MuonNSGD([{"params": [p], "kind": "muon"}], lr=1.0, weight_decay=0.0, momentum=0.0)
    p.grad = torch.randn(128, 32)
    opt.step()
    s = torch.linalg.svdvals(-p.detach())
    assert 2 * 0.6 < s.min() and s.max() < 2 * 1.25


def test_param_groups_cover_model_with_muon_on_all_matrices():
    model = tiny("moe", 2)
    opt = build_optimizer(model, "muon_nsgd")
    kinds = {g["kind"]: g["params"] for g in opt.param_groups}
    assert any(p is model.wte.weight for p in kinds["muon"])  # embeddings (tied head) are matrices
    assert any(p is model.wpe.weight for p in kinds["muon"])
    assert any(p is model.blocks[0].mlp.w_fc for p in kinds["muon"])  # 3-D experts
    assert all(p.ndim < 2 for p in kinds["nsgd"]) and kinds["nsgd"]
    assert sum(len(v) for v in kinds.values()) == len(list(model.parameters()))
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert {g["kind"]: g["weight_decay"] for g in adamw.param_groups} == {"decay": 0.1, "no_decay": 0.0}


@pytest.mark.parametrize("kind", ["gpt", "llama", "moe", "resnet"])
def test_muon_nsgd_trains_every_model(kind):
    from .conftest import batch

    depth = (1, 1, 1, 1) if kind == "resnet" else 1
    model = tiny(kind, depth)
    opt = build_optimizer(model, "muon_nsgd", lr=0.02)
    x, y = batch(kind, n=8)
    losses = []
    for _ in range(8):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_optimizer_settings_raise():
    model = tiny("gpt", 0)
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_optimizer(model, "sgd")
    with pytest.raises(ConfigError, match="optimizer.lr"):
        build_optimizer(model, "muon_nsgd", lr=-1)
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(model, "muon_nsgd", momentum=1.0)
