"""The node shard cache: many processes on one node open the same remote shards at once."""

import multiprocessing as mp
import os

import pytest

from progrow_ray.core import ConfigError
from progrow_ray.data.cache import MARKER, CorruptDataError, _sizes, cached_shards
from progrow_ray.data.prepare import PrepareSettings, prepare, read_meta
from progrow_ray.data.sampler import TokenShards

from ..s3 import make_bucket, reset

QUIET = dict(progress=False, log=lambda _: None)
PROCESSES = 8


def open_shards(uri, cache, barrier, queue):
    """One rank: open both splits once every process is ready (a thundering herd, as at a phase start)."""
    try:
        barrier.wait(timeout=120)
        train = TokenShards(uri, "train", cache_dir=cache)
        val = TokenShards(uri, "val", cache_dir=cache)
        window = train.window(len(train) // 2, 64)
        queue.put(("ok", train.lease.downloaded + val.lease.downloaded, int(window.astype("int64").sum())))
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        queue.put(("error", f"{type(e).__name__}: {e}", None))


@pytest.fixture
def remote_tokens(text_corpus, s3_endpoint):
    reset(s3_endpoint)
    make_bucket("corpus")
    meta = prepare(str(text_corpus), "s3://corpus/tokens", PrepareSettings(0.2, shard_tokens=20_000), **QUIET)
    yield "s3://corpus/tokens", meta
    reset(s3_endpoint)  # moto keeps buckets in the process: leave none for the next test


@pytest.mark.cluster
def test_eight_processes_share_one_cache_with_one_download_per_shard(remote_tokens, tmp_path):
    uri, meta = remote_tokens
    shards = sum(len(s["shards"]) for s in meta["splits"].values())
    assert shards >= 10
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    cache = str(tmp_path / "cache")
    procs = [ctx.Process(target=open_shards, args=(uri, cache, barrier, queue)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok"] * PROCESSES, results
    assert sum(r[1] for r in results) == shards  # exactly one download of each shard on the node
    assert len({r[2] for r in results}) == 1  # every process reads the same tokens
    (local,) = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert (local / MARKER).exists()
    assert not [f for f in local.iterdir() if f.name.endswith(".part")]  # no temporary file left behind
    # a later process finds the node's marker: no download, no hashing
    lease = cached_shards(uri, read_meta(uri), cache)
    assert lease.downloaded == 0 and lease.verified
    lease.close()


@pytest.mark.cluster
def test_a_damaged_cache_is_repaired_and_a_bad_remote_shard_is_refused(remote_tokens, tmp_path):
    uri, meta = remote_tokens
    cache = str(tmp_path / "cache")
    cached_shards(uri, meta, cache).close()
    (local,) = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    first = meta["splits"]["train"]["shards"][0]["file"]
    (local / MARKER).unlink()  # a download that died before its marker, with one shard torn
    (local / first).write_bytes(b"torn")
    lease = cached_shards(uri, meta, cache)
    assert lease.downloaded == 1 and (local / MARKER).exists()
    lease.close()
    # the remote shard itself changed under its meta.json: refused, nothing half-written in the cache
    fs = make_bucket("corpus2")
    fs.copy(f"{uri[5:]}/", "corpus2/tokens/", recursive=True)
    fs.pipe(f"corpus2/tokens/{first}", b"not the shard meta.json names")
    with pytest.raises(CorruptDataError, match="does not match its sha256"):
        TokenShards("s3://corpus2/tokens", "train", cache_dir=cache)
    leftovers = [f for d in (tmp_path / "cache").iterdir() if d.is_dir() for f in d.iterdir()]
    assert not [f for f in leftovers if f.name.endswith(".part") or f.name == first and f.stat().st_size < 10]


@pytest.mark.cluster
def test_the_cache_bound_evicts_datasets_no_process_has_open(remote_tokens, tmp_path):
    uri, meta = remote_tokens
    other = "s3://corpus/tokens-copy"
    import s3fs

    s3fs.S3FileSystem().copy(f"{uri[5:]}/", f"{other[5:]}/", recursive=True)  # another dataset, same size
    size = sum(2 * s["tokens"] + 128 for split in meta["splits"].values() for s in split["shards"])
    cache, limit = str(tmp_path / "cache"), 1.5 * size / 1e9  # room for one of the two
    first = cached_shards(uri, meta, cache, limit)
    with pytest.raises(ConfigError, match="in use by other processes"):
        cached_shards(other, meta, cache, limit)  # the first is open: it cannot go
    first.close()
    second = cached_shards(other, meta, cache, limit)  # now it can
    assert second.downloaded == sum(len(s["shards"]) for s in meta["splits"].values())
    kept = [d.name for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert kept == [os.path.basename(second.path)]
    second.close()
    with pytest.raises(ConfigError, match="cannot hold this dataset"):
        cached_shards(uri, meta, cache, 0.5 * size / 1e9)


def stream_batches(uri, cache, limit_gb, barrier, queue, batches):
    """One rank reading a streamed dataset: the sums of its batches, and the cache's largest size seen."""
    try:
        from progrow_ray.data.sampler import TokenData

        barrier.wait(timeout=120)
        data = TokenData(uri, 32, seed=7, cache_dir=cache, cache_max_gb=limit_gb, block_shards=2)
        sums, most, pins = [], 0, 0
        for b in range(batches):
            barrier.wait(timeout=120)  # in step, as ranks are (every step's collectives hold them together)
            sums.append(int(data.next_batch(6)[0].sum()))
            most = max(most, sum(size for _, size, _ in _sizes(data.train.stream.local)))
            pins = max(pins, len(data.train._pins))
            if b % 500 == 0:  # an evaluation: its shards are unpinned when it ends
                sums.append(sum(int(x.sum()) for x, _ in data.eval_batches(4_000, 4)))
                assert not data.val._pins
        queue.put(("ok", sums, most, data.train.stream.downloaded, pins))
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        queue.put(("error", f"{type(e).__name__}: {e}", 0, 0, 0))


@pytest.mark.cluster
def test_a_corpus_larger_than_the_cache_streams_through_it_a_block_at_a_time(text_corpus, s3_endpoint, tmp_path):
    """data.block_shards: three processes of a node read a remote dataset 4x larger than data.cache_max_gb
    for two epochs: the batches are those of the same data read from a local copy, the cache never
    outgrows its bound, and shards are fetched again after they were removed."""
    from progrow_ray.data.sampler import TokenData

    reset(s3_endpoint)
    make_bucket("corpus")
    settings = PrepareSettings(0.2, shard_tokens=4_000)
    meta = prepare(str(text_corpus), "s3://corpus/tokens", settings, **QUIET)
    prepare(str(text_corpus), str(tmp_path / "local"), settings, **QUIET)
    train = meta["splits"]["train"]
    shard_bytes = 2 * 4_000 + 128
    limit = 12 * shard_bytes  # 3 x (2 + 1) + 2 shards: the least a block of 2 needs
    assert 2 * train["tokens"] + 128 * len(train["shards"]) > 4 * limit
    reference = TokenData(str(tmp_path / "local"), 32, seed=7, block_shards=2)
    n_batches = 2 * reference.sampler.n_windows // 6 + 1  # two epochs
    expected = []
    for b in range(n_batches):
        expected.append(int(reference.next_batch(6)[0].sum()))
        if b % 500 == 0:
            expected.append(sum(int(x.sum()) for x, _ in reference.eval_batches(4_000, 4)))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    cache = str(tmp_path / "cache")
    procs = [ctx.Process(target=stream_batches, args=("s3://corpus/tokens", cache, limit / 1e9, barrier, queue,
                                                      n_batches)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok"] * 3, results
    for _, sums, most, _, pins in results:
        assert sums == expected  # the same order, wherever the shards are read from
        assert most <= limit
        assert pins <= 2 * (2 + 1)  # this block's shards and the last one's
    assert sum(r[3] for r in results) > len(train["shards"])  # removed shards were fetched again
    # a download interrupted by a crash leaves a temporary file: the next download on the node removes it
    data = TokenData("s3://corpus/tokens", 32, seed=7, cache_dir=cache, cache_max_gb=limit / 1e9, block_shards=2)
    local = data.train.stream.local
    for _, _, p in _sizes(local):
        p.unlink()
    (local / ".train_00000.npy.1234.feed.part").write_bytes(b"x" * 5000)
    data.next_batch(6)
    assert not list(local.glob(".*.part")) and data.train.stream.downloaded >= 1
    data.close()
    with pytest.raises(ConfigError, match="too small to stream blocks of data.block_shards=4"):
        TokenData("s3://corpus/tokens", 32, seed=7, cache_dir=cache, cache_max_gb=limit / 1e9, block_shards=4)
    reset(s3_endpoint)
