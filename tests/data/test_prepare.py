import json
import multiprocessing
import os
import shutil
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
ROOT = Path(__file__).resolve().parents[2]


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
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(
        len(enc.encode_ordinary(d)) + 1 for d in docs
    )


@pytest.mark.cluster
def test_reads_and_writes_s3(text_corpus, tmp_path, s3_endpoint):
    fs = make_bucket("corpus")
    for p in sorted(text_corpus.iterdir()):
        fs.put(str(p), f"corpus/raw/{p.name}")
    s = PrepareSettings(val_fraction=0.3)
    # Two tokeniser processes read S3. They fork from a server started before this test's moto endpoint
    # existed (by an earlier test, or now), so they reach it only if they take the caller's environment.
    with pytest.MonkeyPatch.context() as m:
        m.delenv("AWS_ENDPOINT_URL")
        started = multiprocessing.get_context("forkserver").Process(target=print)
        started.start()
        started.join()
    meta = prepare("s3://corpus/raw", "s3://corpus/tokens", s, workers=2, **QUIET)
    local = prepare("s3://corpus/raw", str(tmp_path / "local"), s, workers=2, **QUIET)
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
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "progrow_ray.data",
            "prepare",
            "--source",
            str(text_corpus),
            "--out",
            str(out),
            "--no-progress",
            "--val-fraction",
            "0.2",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (out / "meta.json").exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "progrow_ray.data",
            "prepare",
            "--source",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: data.source")


def test_a_long_text_file_is_read_in_pieces_that_end_at_blank_lines(tmp_path):
    from progrow_ray.data.sources import SourceFile, read_documents

    paragraphs = [f"paragraph {i}: " + "words " * (i % 37 + 5) for i in range(400)]
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "long.txt"
    path.write_text(text)
    f = SourceFile(str(path), "long.txt", path.stat().st_size, "0")
    pieces = list(read_documents(f, piece_bytes=4_096))
    assert len(pieces) > 5 and "".join(pieces) == text  # nothing lost or repeated
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut between paragraphs, never inside one
    assert list(read_documents(f)) == [text]  # a file under the piece size stays one document


def _mixed_corpus(root: Path, n: int = 60) -> Path:
    """jsonl (with blank lines, CRLF endings and empty texts), multi-row-group parquet and text files."""
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{rng.integers(0, 500)}" for _ in range(rng.integers(1, 400))) for _ in range(n)]
    root.mkdir(parents=True)
    lines = []
    for i, d in enumerate(docs):
        lines.append(json.dumps({"text": d if i % 9 else ""}) + ("\r\n" if i % 4 == 0 else "\n"))
        if i % 7 == 0:
            lines.append("\n \u00a0\n")  # blank lines, one of them Unicode whitespace
        if i == 30:
            lines.append(json.dumps({"text": " ".join(docs) * 2}) + "\n")  # one line over many parts
    (root / "a.jsonl").write_text("".join(lines), newline="")
    (root / "cr.jsonl").write_text("".join(json.dumps({"text": d}) + "\r" for d in docs[:9]), newline="")
    pq.write_table(pa.table({"text": docs[::-1]}), root / "b.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": docs}), root / "one-group.parquet")  # one large row group
    for i in range(5):
        (root / f"c{i}.txt").write_text(docs[i] * 3)
    return root


def test_the_parts_of_a_file_hold_exactly_its_documents(tmp_path):
    from progrow_ray.data.sources import list_files, parts, read_documents, read_part

    files = list_files(str(_mixed_corpus(tmp_path / "src")))
    for f in files:
        whole = list(read_documents(f))
        for part_bytes in (37, 500, 4096, 10**9):
            ps = parts(f, part_bytes)
            if f.url.endswith((".jsonl", ".parquet")) and part_bytes < 4096 and f.name != "one-group.parquet":
                assert len(ps) > 1, (f.name, part_bytes)
            assert [d for p in ps for d in read_part(p)] == whole, (f.name, part_bytes)
        assert sum(p.size for p in parts(f, 500)) <= f.size
    by_name = {f.name: f for f in files}
    assert list(read_documents(by_name["cr.jsonl"]))[2] == json.loads((tmp_path / "src" / "cr.jsonl").read_bytes().decode().split("\r")[2])["text"]
    assert len(list(read_documents(by_name["cr.jsonl"]))) == 9  # \r ends a line, as universal newlines do


def test_tokeniser_processes_write_the_bytes_one_process_writes(tmp_path, monkeypatch):
    """The local engine on 1 process and on 3, with files cut into many parts and units (a part's
    documents continue its file's numbering, so the train/val split is the same): the same shards."""
    import progrow_ray.data.prepare as prep

    src = _mixed_corpus(tmp_path / "src")
    monkeypatch.setattr(prep, "PART_BYTES", 5_000)
    monkeypatch.setattr(prep, "UNIT_BYTES", 3_000)
    units = list(prep.work_units(prep.list_files(str(src))))
    assert sum(len(u) for u in units if isinstance(u, list)) > 20
    assert [u.name for u in units if not isinstance(u, list)] == ["one-group.parquet"]  # streamed here
    s = PrepareSettings(val_fraction=0.2, shard_tokens=3_000)
    one = prepare(str(src), str(tmp_path / "one"), s, workers=1, **QUIET)
    three = prepare(str(src), str(tmp_path / "three"), s, workers=3, **QUIET)
    assert one["splits"] == three["splits"] and one["splits"]["val"]["documents"] > 0
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")


def test_tokeniser_processes_do_not_rerun_the_caller_s_script(tmp_path):
    """A script without a ``__main__`` guard calls prepare on two processes: it runs once (a new process
    would otherwise import the caller's main module again, and prepare again)."""
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"f{i}.txt").write_text(f"document {i} " * 300)
    script = tmp_path / "script.py"
    script.write_text(
        "from progrow_ray.data.prepare import PrepareSettings, prepare\n"
        "print('script ran', flush=True)\n"
        f"prepare({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, PrepareSettings(0.3), workers=2, "
        "progress=False, log=lambda _: None)\n"
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("script ran") == 1, p.stdout
    assert read_meta(str(tmp_path / "out")) is not None


def test_a_bad_line_in_a_tokeniser_process_is_one_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"ok{i}.txt").write_text("fine text " * 50)
    (tmp_path / "src" / "z.jsonl").write_text('{"text": "a"}\n{"body": 1}\n')
    with pytest.raises(ConfigError, match=r"z.jsonl at byte 14: expected a JSON line with a 'text' field"):
        prepare(str(tmp_path / "src"), str(tmp_path / "o"), workers=2, **QUIET)
    assert read_meta(str(tmp_path / "o")) is None


@pytest.mark.slow
def test_memory_stays_bounded_on_a_source_file_larger_than_it(tmp_path):
    """A 200 MB jsonl file through prepare in a fresh process: its peak resident memory grows by far less
    than the file (the file is streamed, a batch of documents at a time)."""
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 60}) + "\n"
    with open(src, "w") as fh:
        for _ in range(200_000_000 // len(line)):
            fh.write(line)
    size = src.stat().st_size
    script = (
        "import resource, sys\n"
        "from progrow_ray.data.prepare import PrepareSettings, prepare\n"
        "import numpy, tiktoken, tqdm\n"
        "from progrow_ray.data.tokenizer import gpt2_encoding\n"
        "gpt2_encoding()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"prepare({str(src)!r}, {str(tmp_path / 'out')!r}, PrepareSettings(0.01, shard_tokens=2_000_000),"
        " progress=False, log=lambda _: None)\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    before_kb, after_kb = map(int, p.stdout.split())
    grown = (after_kb - before_kb) * 1024
    assert size > 190e6 and grown < 0.25 * size, (grown, size)  # the old reader held the whole file


@pytest.mark.cluster
def test_ray_data_and_local_engines_write_identical_shards(text_corpus, tmp_path):
    """The Ray Data engine (on a local Ray cluster started by the CLI) and the local engine, on jsonl,
    parquet and text files: the same shard files, byte for byte, and the same meta.json splits."""
    src = tmp_path / "src"
    shutil.copytree(text_corpus, src / "text")
    docs = [p.read_text() for p in sorted(text_corpus.iterdir())]
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": [d[-2000:] for d in docs]}), src / "rows.parquet")
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        cmd = [
            sys.executable,
            "-m",
            "progrow_ray.data",
            "prepare",
            "--source",
            str(src),
            "--out",
            str(outs[engine]),
            "--engine",
            engine,
            "--shard-tokens",
            "30000",
            "--val-fraction",
            "0.2",
            "--no-progress",
        ]
        # a cluster of its own ("local"), never one another process started on this machine
        env = os.environ | {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
    local, ray_out = shard_bytes(outs["local"]), shard_bytes(outs["ray"])
    assert len(local) > 4 and local.keys() == ray_out.keys()
    assert {k: v for k, v in local.items() if k != "meta.json"} == {
        k: v for k, v in ray_out.items() if k != "meta.json"
    }
    assert json.loads(local["meta.json"])["splits"] == json.loads(ray_out["meta.json"])["splits"]
