"""FSDP2, the distributed Muon-NSGD and the sharded expansion against one process, on 2 and 4 gloo ranks;
checkpoints that move between world sizes and parallel modes; the memory estimate against what the ranks
hold. Each test launches its ranks as subprocesses (``tests/dist.py``), as torchrun does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from progrow_ray.engine import CheckpointError, CheckpointManager, Trainer, read_checkpoint
from progrow_ray.engine.memory import estimate
from tests.dist import ROOT, free_port, run_ranks

from .conftest import BASE, make_cfg
from .test_train_cli import per_step_losses, write_config

MODELS = {
    "gpt": {"kind": "gpt", "n_layer": 2, "n_embd": 32, "head_dim": 16},
    "llama": {"kind": "llama", "n_layer": 2, "n_embd": 32, "head_dim": 16, "n_kv_head": 1},
    "moe": {"kind": "moe", "n_layer": 2, "n_embd": 32, "head_dim": 16, "n_experts": 4},
}
TWENTY_STEPS = {"total_tokens": 20 * 512}  # τ at half: the expansion comes at step 10


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_muon_nsgd_equals_one_process(tmp_path, world):
    """20 steps on FSDP2 shards and on DDP replicas (Newton–Schulz once per matrix, on its owner) give the
    one-process weights and momenta, for matrices, stacked experts, convolutions and a vocabulary matrix
    split over all ranks."""
    run_ranks("tests.engine.sharded_worker", world, str(tmp_path / "r.json"), "optimizer")
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result) == 16
    assert max(result.values()) <= 1e-5, result


@pytest.mark.slow
def test_sharded_expansion_equals_expand_depth(tmp_path):
    """Every method, two stages, with and without the copied layers' optimizer state: the sharded model and
    its momenta equal expand_depth's, and stay equal over the next steps."""
    run_ranks("tests.engine.sharded_worker", 2, str(tmp_path / "r.json"), "expansion")
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result) > 150 and any("copying_inter-copy" in k for k in result)
    assert max(result.values()) <= 1e-5, {k: v for k, v in result.items() if v > 1e-5}


@pytest.mark.slow
def test_fsdp_and_ddp_equal_one_process_through_an_expansion(prepared, tmp_path):
    """gpt, llama and moe, 20 steps with an expansion at step 10, on 2 ranks under ddp and fsdp: the same
    losses as one process; under fsdp each rank holds half of the parameters and momenta, exactly what the
    memory estimate says. (Each matrix's Newton–Schulz whole on its owner: the one-process arithmetic; the
    split one is checked at 1e-5 by the optimizer test.)"""
    runs = {
        f"{kind}-{mode}": {
            "model": model,
            "train": {**TWENTY_STEPS, "parallel": mode},
            "optimizer": {"ns_split": False},  # an MoE's routing turns summation-order noise into flips
        }
        for kind, model in MODELS.items()
        for mode in ("ddp", "fsdp")
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": prepared, "out": str(tmp_path / "dist"), "runs": runs}))
    run_ranks("tests.engine.parallel_worker", 2, str(spec), str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    for kind, model in MODELS.items():
        events = []
        cfg = make_cfg(prepared, str(tmp_path / kind), model=model, train=TWENTY_STEPS)
        one = Trainer(cfg, on_metrics=events.append, log=lambda _: None).run()
        losses = [e["train_loss"] for e in events if e["event"] == "train"]
        assert len(losses) == 20 and one.depth == 2
        for mode in ("ddp", "fsdp"):
            r = result[f"{kind}-{mode}"]
            assert r["parallel"] == mode and r["depths"][9] == 0 and r["depths"][10] == 2
            for a, b in zip(r["losses"], losses, strict=True):
                assert a == pytest.approx(b, rel=1e-5)
            assert r["val_loss"] == pytest.approx(one.val_loss, rel=1e-5)
        ddp, fsdp = result[f"{kind}-ddp"]["bytes"], result[f"{kind}-fsdp"]["bytes"]
        for rank in range(2):
            for what in (0, 1):  # parameters, optimizer state
                assert fsdp[rank][what] == pytest.approx(ddp[rank][what] / 2, rel=0.02)
        expected = estimate(cfg, cfg.target_model_config(), 2, "fsdp", cuda=False)
        assert fsdp[0] == [expected.parameters, expected.optimizer]
        assert ddp[0] == [estimate(cfg, cfg.target_model_config(), 2, "ddp", cuda=False).parameters] * 2


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_batch_trains_the_same_update(prepared, tmp_path):
    """An elastic phase may resize to 3 workers: 16 sequences in micro-batches of 3 (3,3,3,3,3,1) dealt
    2/2/2 with unequal sizes, weighted by their examples, on 3 ranks under ddp and fsdp (fsdp pads no
    rank here; the plan tests cover that) give one process's losses through an expansion, gpt and moe."""
    models = {k: MODELS[k] for k in ("gpt", "moe")}
    train = {**TWENTY_STEPS, "micro_batch": 3}
    runs = {
        f"{kind}-{mode}": {
            "model": model,
            "train": {**train, "parallel": mode},
            "optimizer": {"ns_split": False},
        }
        for kind, model in models.items()
        for mode in ("ddp", "fsdp")
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": prepared, "out": str(tmp_path / "dist"), "runs": runs}))
    run_ranks("tests.engine.parallel_worker", 3, str(spec), str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    for kind, model in models.items():
        events = []
        cfg = make_cfg(prepared, str(tmp_path / kind), model=model, train=train)
        one = Trainer(cfg, on_metrics=events.append, log=lambda _: None).run()
        losses = [e["train_loss"] for e in events if e["event"] == "train"]
        assert len(losses) == 20
        for mode in ("ddp", "fsdp"):
            r = result[f"{kind}-{mode}"]
            assert r["parallel"] == mode and r["depths"][10] == 2
            for a, b in zip(r["losses"], losses, strict=True):
                assert a == pytest.approx(b, rel=1e-5)
            assert r["val_loss"] == pytest.approx(one.val_loss, rel=1e-5)


def torchrun(config: Path, world: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    cmd += ["--master_port", str(free_port()), "-m", "progrow_ray.train", "--config", str(config)]
    proc = subprocess.run(
        [*cmd, "--no-progress", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def one_process(config: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "progrow_ray.train", "--config", str(config), "--no-progress", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def final_val_loss(run_dir: Path) -> float:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["val_loss"] for e in events if e["event"] == "eval"][-1]


def keep_checkpoints_up_to(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` as it was after ``step``: its checkpoints up to there, no metrics."""
    (dst / "checkpoints").mkdir(parents=True)
    for ckpt in (src / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) <= step:
            shutil.copytree(ckpt, dst / "checkpoints" / ckpt.name)


@pytest.mark.slow
def test_torchrun_fsdp_run_resumes_on_other_world_sizes(text_corpus, prepared, tmp_path):
    """``torchrun --nproc_per_node 2 -m progrow_ray.train --set train.parallel=fsdp`` ends at the
    one-process validation loss; its checkpoint after the expansion resumes on 1 process and on 4 FSDP
    ranks with the same per-step losses; a one-process checkpoint resumes under fsdp."""
    config = write_config(tmp_path / "c.yaml", text_corpus, prepared, tmp_path / "runs")
    data = yaml.safe_load(config.read_text())
    data["train"]["keep_checkpoints"] = 20
    data["optimizer"] = {"ns_split": False}  # the one-process arithmetic, so resumes compare at 1e-5
    config.write_text(yaml.safe_dump(data))
    name = BASE["name"]
    # the default (the vocabulary matrix's Newton–Schulz split over the ranks): equal up to summation order
    torchrun(
        config,
        2,
        "--set",
        "train.parallel=fsdp",
        "--set",
        "optimizer.ns_split=true",
        "--out",
        str(tmp_path / "split"),
    )
    torchrun(config, 2, "--set", "train.parallel=fsdp", "--out", str(tmp_path / "fsdp2"))
    one_process(config, "--out", str(tmp_path / "one"))
    fsdp2, one = per_step_losses(tmp_path / "fsdp2" / name), per_step_losses(tmp_path / "one" / name)
    assert sorted(fsdp2) == sorted(one) and len(one) == 32
    for step in one:
        assert fsdp2[step] == pytest.approx(one[step], rel=1e-5)
    assert final_val_loss(tmp_path / "split" / name) == pytest.approx(
        final_val_loss(tmp_path / "one" / name), rel=1e-4
    )
    assert final_val_loss(tmp_path / "fsdp2" / name) == pytest.approx(
        final_val_loss(tmp_path / "one" / name), rel=1e-6
    )

    check_sharded_checkpoints(tmp_path / "fsdp2" / name / "checkpoints", tmp_path / "damaged")

    # the fsdp checkpoint at step 20 (after τ = step 16) on 1 process and on 4 fsdp ranks
    keep_checkpoints_up_to(tmp_path / "fsdp2" / name, tmp_path / "to1" / name, 20)
    one_process(config, "--out", str(tmp_path / "to1"))
    keep_checkpoints_up_to(tmp_path / "fsdp2" / name, tmp_path / "to4" / name, 20)
    torchrun(
        config,
        4,
        "--set",
        "train.parallel=fsdp",
        "--set",
        "train.micro_batch=4",
        "--out",
        str(tmp_path / "to4"),
    )
    # and a one-process checkpoint (positional optimizer state) at step 12, before τ, on 2 fsdp ranks
    keep_checkpoints_up_to(tmp_path / "one" / name, tmp_path / "from1" / name, 12)
    torchrun(config, 2, "--set", "train.parallel=fsdp", "--out", str(tmp_path / "from1"))
    for run, first in (("to1", 21), ("to4", 21), ("from1", 13)):
        resumed = per_step_losses(tmp_path / run / name)
        assert min(resumed) == first and max(resumed) == 32
        for step, loss in resumed.items():
            assert loss == pytest.approx(one[step], rel=1e-5), (run, step)


def check_sharded_checkpoints(root: Path, scratch: Path) -> None:
    """Each rank wrote its own shard file, all listed with their sha256 in the manifest; a corrupted, missing
    or unlisted shard is a clear error, and the newest checkpoint that verifies is used instead."""
    newest = sorted(root.iterdir())[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["format"] == "progrow_ray.checkpoint.v2" and manifest["world_size"] == 2
    assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp", "state.json"} <= set(
        manifest["files"]
    )
    assert not (newest / "model.pt").exists()  # nothing gathered into one rank's memory
    files = read_checkpoint(str(newest))
    assert files["shards"] == str(newest) and files["state.json"]["parallel"] == "fsdp"

    def damaged(how) -> Path:
        copy = scratch / f"case{len(list(scratch.iterdir())) if scratch.exists() else 0}" / "checkpoints"
        shutil.copytree(root, copy)
        how(sorted(copy.iterdir())[-1])
        return copy

    torn = damaged(lambda d: (d / "shards" / "__1_0.distcp").write_bytes(b"torn write"))
    with pytest.raises(CheckpointError, match=r"shards/__1_0.distcp does not match its sha256"):
        read_checkpoint(str(sorted(torn.iterdir())[-1]))
    gone = damaged(lambda d: (d / "shards" / "__0_0.distcp").unlink())
    with pytest.raises(CheckpointError, match=r"shards/__0_0.distcp is missing"):
        read_checkpoint(str(sorted(gone.iterdir())[-1]))

    def unlist(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        del m["files"]["shards/__1_0.distcp"]
        (d / "manifest.json").write_text(json.dumps(m))

    with pytest.raises(CheckpointError, match=r"lists shards of 1 of 2 ranks"):
        read_checkpoint(str(sorted(damaged(unlist).iterdir())[-1]))
    warnings = []
    uri, _ = CheckpointManager(str(torn), log=warnings.append).load_latest()
    assert uri.endswith(sorted(root.iterdir())[-2].name) and "does not match its sha256" in warnings[0]


def test_shard_metadata_unpickler_refuses_code():
    """DCP's .metadata is a pickle: only its metadata classes load; a global like os.system is refused."""
    import io
    import pickle

    from progrow_ray.engine.sharded_checkpoint import _MetadataUnpickler

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system; refused"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    from torch.distributed.checkpoint.metadata import Metadata

    assert isinstance(_MetadataUnpickler(io.BytesIO(pickle.dumps(Metadata({})))).load(), Metadata)
