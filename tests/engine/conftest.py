from progrow_ray.engine.config import RunConfig, deep_merge, from_dict

BASE = {
    "name": "t",
    "model": {"kind": "gpt", "n_layer": 2, "n_embd": 32, "head_dim": 16},
    "growth": {"enabled": True, "source_depth": 0, "method": "random", "tau_frac": 0.5},
    "data": {"seq_len": 32},
    "train": {
        "total_tokens": 8192,
        "batch_tokens": 512,
        "micro_batch": 8,
        "eval_every_tokens": 4096,
        "eval_tokens": 1024,
        "log_every": 1,
        "seed": 3,
    },
    "schedule": {"warmup_frac": 0.1, "decay_frac": 0.2},
}


def make_cfg(data_uri: str, out: str, **sections) -> RunConfig:
    data = deep_merge(BASE, {"out": out, "data": {"uri": data_uri}})
    data = deep_merge(data, sections)
    return from_dict(RunConfig, data).validate()
