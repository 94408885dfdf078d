import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from progrow_ray.core import ConfigError
from progrow_ray.data.prepare import PrepareSettings, prepare, read_meta
from progrow_ray.data.sampler import CorruptDataError, TokenShards
from progrow_ray.data.tokenizer import gpt2_encoding

from ..s3 import make_bucket

QUIET = dict(progress=False, log=lambda _: None)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_prepare_is_deterministic_and_idempotent(text_corpus, tmp_path):
    s = PrepareSettings(val_fraction=0.2, shard_tokens=20_000)
    a, b = tmp_path / "a", tmp_path / "b"
    meta = prepare(str(text_corpus), str(a), s, **QUIET)
    prepare(str(text_corpus), str(b), s, **QUIET)
    assert shard_bytes(a) == shard_bytes(b)
    assert len(meta["splits"]["train"]["shards"]) > 1  # several shards of 20k tokens
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    enc = gpt2_encoding()
    expected = sum(len(enc.encode_ordinary(p.read_text())) + 1 for p in text_corpus.iterdir())
    assert total == expected  # every document, plus one <|endoftext|> each
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    logs = []
    prepare(str(text_corpus), str(a), s, progress=False, log=logs.append)
    assert "up to date" in logs[0]
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == mtimes  # nothing rewritten
    # a changed setting is a different dataset: it is rebuilt
    prepare(str(text_corpus), str(a), PrepareSettings(val_fraction=0.3, shard_tokens=20_000), **QUIET)
    assert read_meta(str(a))["settings"]["val_fraction"] == 0.3


def test_split_is_per_document_and_stable(text_corpus, tmp_path):
    meta = prepare(str(text_corpus), str(tmp_path / "x"), PrepareSettings(val_fraction=0.3), **QUIET)
    assert 0 < meta["splits"]["val"]["documents"] < meta["splits"]["train"]["documents"]
    shards = TokenShards(str(tmp_path / "x"), "train")
    tokens = np.concatenate(shards.arrays)
    assert (tokens == 50256).sum() == meta["splits"]["train"]["documents"]


def test_jsonl_and_parquet_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"document number {i}: " + "some words " * (i + 3) for i in range(60)]
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:30]) + "\n")
    pq.write_table(pa.table({"text": docs[30:], "id": list(range(30))}), src / "b.parquet")
    meta = prepare(str(src / "*"), str(tmp_path / "out"), PrepareSettings(val_fraction=0.2), **QUIET)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    enc = gpt2_encoding()
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)


@pytest.mark.cluster
def test_reads_and_writes_s3(text_corpus, tmp_path, s3_endpoint):
    fs = make_bucket("corpus")
    for p in sorted(text_corpus.iterdir()):
        fs.put(str(p), f"corpus/raw/{p.name}")
    s = PrepareSettings(val_fraction=0.3)
    meta = prepare("s3://corpus/raw", "s3://corpus/tokens", s, **QUIET)
    local = prepare("s3://corpus/raw", str(tmp_path / "local"), s, **QUIET)
    assert meta["splits"] == local["splits"]  # same shards, same sha256, wherever they are written
    assert fs.exists("corpus/tokens/meta.json")
    logs = []
    prepare("s3://corpus/raw", "s3://corpus/tokens", s, progress=False, log=logs.append)
    assert "up to date" in logs[0]
    shards = TokenShards("s3://corpus/tokens", "train", cache_dir=str(tmp_path / "cache"))
    assert len(shards) == meta["splits"]["train"]["tokens"]


def test_bad_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no input files"):
        prepare(str(empty), str(tmp_path / "o"), **QUIET)
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="empty"):
        prepare(str(empty), str(tmp_path / "o"), **QUIET)
    assert read_meta(str(tmp_path / "o")) is None  # nothing published
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match="'text' field"):
        prepare(str(tmp_path / "bad.jsonl"), str(tmp_path / "o2"), **QUIET)


def test_corrupted_shard_is_detected(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = sorted(copy.glob("train_*.npy"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="sha256"):
        TokenShards(str(copy), "train")
    os.remove(shard)
    with pytest.raises(CorruptDataError, match="missing"):
        TokenShards(str(copy), "train")
    with pytest.raises(ConfigError, match="meta.json missing"):
        TokenShards(str(tmp_path / "nowhere"), "train")


def test_cli_prepare_and_bad_input_exit_code(text_corpus, tmp_path):
    out = tmp_path / "cli"
    ok = subprocess.run([sys.executable, "-m", "progrow_ray.data", "prepare", "--source", str(text_corpus),
                         "--out", str(out), "--no-progress", "--val-fraction", "0.2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (out / "meta.json").exists()
    bad = subprocess.run([sys.executable, "-m", "progrow_ray.data", "prepare", "--source", str(tmp_path / "none"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: data.source")
