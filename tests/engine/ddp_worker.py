"""Entry point of one torch.distributed (gloo) rank for test_ddp.py."""

import json
import os
import sys

import torch.distributed as dist


def main(rank: int, world: int, port: int, data_uri: str, out: str, result_path: str) -> None:
    from progrow_ray.engine import Trainer
    from progrow_ray.engine.parallel import end_process_group
    from tests.engine.conftest import make_cfg

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clean = False
    try:
        events = []
        cfg = make_cfg(data_uri, out, growth={"tau_frac": 0.25, "batch_tokens_after": 1024})
        result = Trainer(cfg, on_metrics=events.append, log=lambda _: None).run()
        if rank == 0:
            with open(result_path, "w") as fh:
                json.dump(
                    {
                        "events": events,
                        "result": {k: getattr(result, k) for k in ("val_loss", "tokens", "step")},
                    },
                    fh,
                )
        clean = True
    finally:
        end_process_group(clean)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
