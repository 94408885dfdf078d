import json

import pytest
import torch

from progrow_ray.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    read_checkpoint,
    write_checkpoint,
)

from ..s3 import make_bucket


def files(step: int) -> dict:
    return {"model.pt": {"w": torch.full((3,), float(step))}, "state.json": {"step": step}}


def test_round_trip_and_atomic_layout(tmp_path):
    uri = write_checkpoint(str(tmp_path / "ck"), files(1))
    loaded = read_checkpoint(uri)
    assert torch.equal(loaded["model.pt"]["w"], torch.ones(3)) and loaded["state.json"] == {"step": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # temp dir renamed away
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "state.json"}


def test_corrupted_and_partial_checkpoints_are_detected(tmp_path):
    uri = write_checkpoint(str(tmp_path / "ck"), files(1))
    p = tmp_path / "ck" / "model.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(uri)
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint(uri)


class Payload:  # stands for any object whose unpickling could run code
    pass


def test_only_tensors_load(tmp_path):
    """weights_only=True: a pickled object that is not plain tensors/containers is refused."""
    uri = write_checkpoint(str(tmp_path / "ck"), {"evil.pt": {"x": torch.ones(1)}})
    import hashlib
    import io

    buf = io.BytesIO()
    torch.save({"obj": Payload()}, buf)
    (tmp_path / "ck" / "evil.pt").write_bytes(buf.getvalue())
    m = tmp_path / "ck" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["files"]["evil.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
    m.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_checkpoint(uri)


def test_manager_keeps_newest_and_skips_a_corrupt_one(tmp_path):
    logs = []
    m = CheckpointManager(str(tmp_path / "run"), keep=2, log=logs.append)
    for step in (10, 20, 30):
        m.save(step, files(step))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_00000020", "step_00000030"]
    (tmp_path / "run" / "step_00000030" / "state.json").write_text('{"step": 999}')
    uri, loaded = m.load_latest()
    assert uri.endswith("step_00000020") and loaded["state.json"]["step"] == 20
    assert "skipping" in logs[0] and "step_00000030" in logs[0]
    assert CheckpointManager(str(tmp_path / "none")).load_latest() is None


@pytest.mark.cluster
def test_checkpoints_on_s3(s3_endpoint):
    fs = make_bucket("ckpt")
    m = CheckpointManager("s3://ckpt/run1", keep=1)
    m.save(1, files(1))
    m.save(2, files(2))
    assert fs.ls("ckpt/run1") == ["ckpt/run1/step_00000002"]
    uri, loaded = m.load_latest()
    assert uri == "s3://ckpt/run1/step_00000002" and loaded["state.json"]["step"] == 2
    fs.rm("ckpt/run1/step_00000002/manifest.json")  # a save cut off before its manifest
    assert m.load_latest() is None


@pytest.mark.cluster
def test_s3_outage_during_a_save_is_retried_and_nothing_is_lost(monkeypatch):
    """The S3 endpoint goes away just before a save and comes back 12 s later on the same port. s3fs's and
    botocore's own retries are turned down to one attempt (under load they sometimes ride out a short
    outage on their own), so our backoff must carry the save; the checkpoint is then complete and verifies."""
    import socket
    import threading
    import time

    import s3fs
    from moto.server import ThreadedMotoServer

    from progrow_ray.engine import checkpoint as ckpt_mod

    from ..s3 import CREDENTIALS, make_bucket

    with socket.socket() as sock:  # a fixed port: the server must come back where the client looks
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host = "127.0.0.1"
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        make_bucket("outage")
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()  # down
        logs = []
        from progrow_ray.integrations import storage

        monkeypatch.setattr(storage, "RETRY_DELAYS_S", (1, 2, 4, 8, 16))

        def come_back():
            time.sleep(12)
            server.start()

        threading.Thread(target=come_back, daemon=True).start()
        t0 = time.time()
        orig = storage.with_retries
        monkeypatch.setattr(
            storage,
            "with_retries",
            lambda op, what, **kw: orig(op, what, delays=storage.RETRY_DELAYS_S, log=logs.append),
        )
        ckpt_mod.write_checkpoint("s3://outage/run/step_00000001", files(1))
        assert time.time() - t0 >= 12 and logs and all("retrying" in line for line in logs)
        assert ckpt_mod.read_checkpoint("s3://outage/run/step_00000001")["state.json"]["step"] == 1
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
