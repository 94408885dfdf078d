import pytest
import torch
from torch import nn

from progrow_ray.core import ConfigError, MuonNSGD, build_optimizer, newton_schulz
from progrow_ray.core.optim import as_matrices

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


def test_matrix_views():
    assert as_matrices(torch.zeros(8, 3, 3, 3)).shape == (8, 27)  # conv: (out, in*kh*kw)
    assert as_matrices(torch.zeros(4, 16, 64)).shape == (4, 16, 64)  # experts: batch of matrices


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
    opt_ours = MuonNSGD([{"params": [ours], "kind": "muon"}], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
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
