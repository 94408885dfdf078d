"""The README's core example: a 0-layer GPT-2 trained a few steps, expanded to 12 layers, trained on.

Pure torch (no Ray, MLflow or S3). Runs in seconds on a laptop CPU with the small width below;
drop the overrides for the real 124M-target model.
"""

import torch

from progrow_ray.core import WSD, build_model, build_optimizer, expand_depth, step_lr

torch.manual_seed(0)
model = build_model("gpt", n_layer=0, n_embd=128, vocab_size=512, block_size=64)  # zero-layer model
opt = build_optimizer(model, "muon_nsgd", lr=0.01, weight_decay=0.1)  # the paper's Muon-NSGD
batch_tokens, total_tokens = 8 * 64, 40 * 8 * 64
schedule = WSD(total_tokens, warmup_frac=0.02, decay_frac=0.2)  # a function of tokens seen
data = torch.randint(0, 512, (8, 65))  # stand-in for real token batches
x, y = data[:, :-1], data[:, 1:]

tokens = 0
for step in range(40):
    if step == 20:  # tau: expand in the stable phase; optimizer state of old params is kept
        record = expand_depth(model, 12, "random", optimizer=opt)
        print(f"expanded to {model.config.n_layer} layers, {record.new_parameters:,} new parameters")
    for g in opt.param_groups:
        g["lr"] = step_lr(schedule, 0.01, tokens, batch_tokens)
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens += batch_tokens
    if step % 10 == 9:
        print(f"step {step + 1:3d}  depth {model.config.n_layer:2d}  loss {loss.item():.3f}")
