"""One gloo rank for test_parallel.py: runs each requested (model, parallel mode) config with the Trainer and
writes rank 0's train losses, final validation loss and every rank's parameter / optimizer bytes."""

import json
import sys

import torch
import torch.distributed as dist


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def run_one(data: str, out: str, sections: dict) -> dict:
    from progrow_ray.engine import Trainer
    from tests.engine.conftest import make_cfg

    events = []
    trainer = Trainer(make_cfg(data, out, **sections), on_metrics=events.append, log=lambda _: None)
    result = trainer.run()
    opt_tensors = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    sizes = torch.tensor(
        [local_bytes(trainer.model.parameters()), local_bytes(opt_tensors)], dtype=torch.int64
    )
    gathered = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sizes)
    return {
        "parallel": trainer.parallel,
        "losses": [e["train_loss"] for e in events if e["event"] == "train"],
        "depths": [e["depth"] for e in events if e["event"] == "train"],
        "val_loss": result.val_loss,
        "bytes": [g.tolist() for g in gathered],
    }


def main(spec_path: str, result_path: str) -> None:
    from progrow_ray.engine.parallel import end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = json.loads(open(spec_path).read())
    clean = False
    try:
        results = {key: run_one(spec["data"], f"{spec['out']}/{key}", s) for key, s in spec["runs"].items()}
        if dist.get_rank() == 0:
            with open(result_path, "w") as fh:
                json.dump(results, fh)
        clean = True
    finally:
        end_process_group(clean)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
