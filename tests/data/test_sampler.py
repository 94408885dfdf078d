import numpy as np
import torch

from progrow_ray.data.sampler import SequenceSampler, TokenShards, eval_batches
from progrow_ray.engine.step import plan_batch


def test_window_spans_shards(text_corpus, tmp_path):
    from progrow_ray.data.prepare import PrepareSettings, prepare

    prepare(str(text_corpus), str(tmp_path / "small"), PrepareSettings(val_fraction=0.2, shard_tokens=5000),
            progress=False, log=lambda _: None)
    shards = TokenShards(str(tmp_path / "small"), "train")
    assert len(shards.arrays) > 3
    flat = np.concatenate(shards.arrays)
    for start in (0, 17, 4990, 9999, len(flat) - 40):
        assert np.array_equal(shards.window(start, 33), flat[start:start + 33])


def test_global_batches_do_not_depend_on_world_size(prepared):
    shards = TokenShards(prepared, "train")
    for world in (2, 3, 4):  # 8 examples in micro-batches 3, 3, 2: dealt 2+1, 1+1+1, 1+1+1+0
        ranks = [SequenceSampler(shards, 32, seed=5) for _ in range(world)]
        single = SequenceSampler(shards, 32, seed=5)
        for _ in range(3):
            x1, y1 = single.next_batch(8)
            plans = [plan_batch(8, 3, r, world, same_count=False) for r in range(world)]
            # a rank without a micro-batch reads one filler example (as the Trainer does)
            parts = [s.next_batch(8, *p.reads) for s, p in zip(ranks, plans)]
            parts = [part for part, p in zip(parts, plans) if p.sizes]
            assert torch.equal(x1, torch.cat([p[0] for p in parts]))
            assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
        assert all(s.consumed == single.consumed == 24 for s in ranks)


def test_resume_and_reshard_continue_exactly(prepared):
    shards = TokenShards(prepared, "train")
    full = SequenceSampler(shards, 32, seed=1)
    expected = [full.next_batch(8)[0] for _ in range(5)]
    first = SequenceSampler(shards, 32, seed=1)
    first.next_batch(8)
    first.next_batch(8)
    state = first.state_dict()
    # resume on 2 workers with a 2x larger batch: the next 16 sequences are batches 3 and 4
    a, b = SequenceSampler(shards, 32, seed=1), SequenceSampler(shards, 32, seed=1)
    a.load_state_dict(state)
    b.load_state_dict(state)
    xa, _ = a.next_batch(16, 0, 8)
    xb, _ = b.next_batch(16, 8, 8)
    assert torch.equal(torch.cat([xa, xb]), torch.cat(expected[2:4]))


def test_epochs_reshuffle_and_cover_every_window(prepared):
    shards = TokenShards(prepared, "train")
    s = SequenceSampler(shards, 256, seed=0)
    n = s.n_windows
    assert sorted(s._order(0).tolist()) == list(range(n))  # each epoch visits every window once
    flat = np.concatenate(shards.arrays)
    for k in range(n + 2):  # into the second epoch
        x, _ = s.next_batch(1)
        start = int(s._order(k // n)[k % n]) * 256
        assert np.array_equal(x[0].numpy(), flat[start:start + 256])
    assert not np.array_equal(s._order(0), s._order(1))
    assert SequenceSampler(shards, 256, seed=1)._order(0).tolist() != s._order(0).tolist()


def test_eval_windows_are_fixed_and_split_over_ranks(prepared):
    shards = TokenShards(prepared, "val")
    whole = torch.cat([x for x, _ in eval_batches(shards, 32, 1024, 4)])
    assert whole.shape == (32, 32)
    parts = [torch.cat([x for x, _ in eval_batches(shards, 32, 1024, 4, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, whole.tolist()))


def test_block_order_covers_every_window_once_an_epoch_and_reads_a_block_at_a_time(text_corpus, tmp_path):
    from progrow_ray.data.prepare import PrepareSettings, prepare

    prepare(str(text_corpus), str(tmp_path / "d"), PrepareSettings(val_fraction=0.2, shard_tokens=3000),
            progress=False, log=lambda _: None)
    shards = TokenShards(str(tmp_path / "d"), "train")
    assert len(shards.shard_meta) >= 8
    s = SequenceSampler(shards, 32, seed=3, block_shards=2)
    n, bw = s.n_windows, s.block_windows
    assert bw == 2 * 3000 // 32 and s.n_blocks == -(-n // bw)
    for epoch in (0, 1):
        ids = [s.window_index(epoch * n + i) for i in range(n)]
        assert sorted(ids) == list(range(n))  # every window once an epoch
        blocks = [i // bw for i in ids]
        changes = sum(a != b for a, b in zip(blocks, blocks[1:]))
        assert changes == s.n_blocks - 1  # one block after another, never back
        for k in range(s.n_blocks):  # a block's windows lie within K + 1 shards
            touched = {sh for i in ids if i // bw == k for sh in shards.shards_of(i * 32, 33)}
            assert len(touched) <= 3
    first = [s.window_index(i) for i in range(n)]
    assert first != [s.window_index(n + i) for i in range(n)]  # a new order each epoch
    assert first != sorted(first)
    other = SequenceSampler(shards, 32, seed=4, block_shards=2)
    assert first != [other.window_index(i) for i in range(n)]
    # the batches a resumed sampler reads continue the original's, and the block size is part of the state
    a = SequenceSampler(shards, 32, seed=3, block_shards=2)
    batches = [a.next_batch(5)[0] for _ in range(6)]
    b = SequenceSampler(shards, 32, seed=3, block_shards=2)
    for _ in range(3):
        b.next_batch(5)
    c = SequenceSampler(shards, 32, seed=3, block_shards=2)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_batch(5)[0], x) for x in batches[3:])
    import pytest

    from progrow_ray.core import ConfigError

    with pytest.raises(ConfigError, match="data.block_shards must stay the same"):
        SequenceSampler(shards, 32, seed=3).load_state_dict(b.state_dict())
