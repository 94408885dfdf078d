import pytest
import torch

from progrow_ray.core import build_model

TINY_LM = dict(vocab_size=96, block_size=32, n_embd=64, head_dim=16)


def tiny(kind: str, depth, **over):
    """Small configs of every testbed model, at a given depth (int, or 4 ints for ResNet)."""
    if kind == "resnet":
        return build_model(
            "resnet", blocks=tuple(depth), **{"base_width": 4, "num_classes": 10, "stem": "cifar", **over}
        )
    if kind == "moe":
        return build_model("moe", n_layer=depth, **{**TINY_LM, "n_experts": 4, **over})
    if kind == "llama":
        return build_model("llama", n_layer=depth, n_kv_head=2, multiple_of=32, **{**TINY_LM, **over})
    return build_model("gpt", n_layer=depth, **{**TINY_LM, **over})


def batch(kind: str, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "resnet":
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    idx = torch.randint(0, TINY_LM["vocab_size"], (n, TINY_LM["block_size"] + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
