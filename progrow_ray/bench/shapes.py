"""Model shapes the step and optimizer benchmarks share (no torch: the CLI imports it)."""

SHAPES = {
    "tiny": dict(n_layer=4, n_embd=128, head_dim=64),
    "gpt2-124m": dict(n_layer=12, n_embd=768, head_dim=64),
}
