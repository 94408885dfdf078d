"""Memory-mapped token shards and a sampler whose order depends only on (seed, sequences consumed).

The global order of training windows is a seeded permutation per epoch. Global step ``s`` takes the
next ``B`` windows of that order; rank ``r`` of ``W`` takes the ``r``-th contiguous slice of them.
So the set of sequences in every global batch is the same for any world size, and a run resumed —
on the same or a different number of workers, with the same or a larger batch — continues exactly
where it stopped.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import torch

from ..core.errors import ConfigError, require
from ..integrations.storage import filesystem, is_local
from .cache import (CorruptDataError, StreamedShards, cached_shards, default_cache_dir, file_sha256,
                    local_verified, mark_local_verified)
from .prepare import FORMAT, read_meta

__all__ = ["CorruptDataError", "TokenShards", "TokenData", "SequenceSampler", "default_cache_dir"]


def _check_sha(uri: str, root: str, shard: dict) -> None:
    path = os.path.join(root, shard["file"])
    if not os.path.exists(path):
        raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} is missing; re-run prepare")
    if file_sha256(path) != shard["sha256"]:
        raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} does not match its sha256 in "
                               "meta.json (corrupted or partially written); re-run prepare")


class TokenShards:
    """One split (train / val) of a prepared dataset, as a single virtual token array."""

    def __init__(self, uri: str, split: str, verify: bool = True, cache_dir: str | None = None,
                 cache_max_gb: float | None = None, streamed: bool = False):
        meta = read_meta(uri)
        if meta is None:
            raise ConfigError(f"data.uri {uri}: no prepared data (meta.json missing); run "
                              f"`python -m progrow_ray.data prepare --source SOURCE --out {uri}`")
        require(meta.get("format") == FORMAT, f"data.uri {uri}: unknown format {meta.get('format')!r}")
        require(split in meta["splits"], f"data.uri {uri}: no split {split!r}")
        self.meta, self.split, self.uri = meta, split, uri
        fs, root = filesystem(uri)
        self.lease = None  # a remote dataset: this node's cached copy, pinned while the shards are open
        self.stream: StreamedShards | None = None
        self.shard_meta = meta["splits"][split]["shards"]
        self.starts = np.cumsum([0] + [s["tokens"] for s in self.shard_meta])
        if streamed and not is_local(fs):  # fetched as they are reached (data.block_shards)
            require(cache_max_gb is not None, "data.block_shards streams remote shards through the node cache: "
                                              "set data.cache_max_gb, the most it may hold")
            self.stream = StreamedShards(uri, meta, cache_dir, cache_max_gb)
            self.arrays: list[np.ndarray | None] = [None] * len(self.shard_meta)
            self._pins: OrderedDict[int, int] = OrderedDict()  # open shard -> its lock fd, oldest first
            self.max_open = 2
            self._prefetching: threading.Thread | None = None
            return
        if not is_local(fs):
            self.lease = cached_shards(uri, meta, cache_dir, cache_max_gb, log=print)
            root = self.lease.path
            verify = verify and not self.lease.verified  # verified once per node, by its downloader
        elif verify:  # every split's shards, once per node and file version
            if not local_verified(root, meta, cache_dir):
                for shard in (s for part in meta["splits"].values() for s in part["shards"]):
                    _check_sha(uri, root, shard)
                mark_local_verified(root, meta, cache_dir)
            verify = False
        self.arrays = []
        for shard in self.shard_meta:
            path = os.path.join(root, shard["file"])
            if verify:
                _check_sha(uri, root, shard)
            elif not os.path.exists(path):
                raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} is missing; re-run prepare")
            self.arrays.append(_map(uri, path, shard))

    def _array(self, i: int) -> np.ndarray:
        a = self.arrays[i]
        if a is not None:
            if self.stream is not None:
                self._pins.move_to_end(i)
            return a
        path, fd = self.stream.open(self.shard_meta[i])
        try:
            self.arrays[i] = _map(self.uri, path, self.shard_meta[i])
        except BaseException:
            os.close(fd)
            raise
        self._pins[i] = fd
        while len(self._pins) > self.max_open:  # unpin the least recently read: the node may remove it
            self._unpin(next(iter(self._pins)))
        return self.arrays[i]

    def _unpin(self, i: int) -> None:
        self.arrays[i] = None
        os.close(self._pins.pop(i))

    def keep_only(self, shards: set[int]) -> None:
        """Unpin every open shard not in ``shards`` (streamed data only): the node may remove them."""
        if self.stream is not None:
            for i in [i for i in self._pins if i not in shards]:
                self._unpin(i)

    def close(self) -> None:
        """Unpin every shard and give up the dataset's lease (streamed data; a no-op otherwise)."""
        if self.stream is not None:
            self.keep_only(set())
            self.stream.close()

    def __del__(self):
        if getattr(self, "_pins", None) is not None:
            self.close()

    def shards_of(self, start: int, length: int) -> range:
        """The shards that tokens [start, start + length) lie in."""
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        last = int(np.searchsorted(self.starts, start + length - 1, side="right") - 1)
        return range(first, min(last, len(self.shard_meta) - 1) + 1)

    def prefetch(self, shards: range) -> None:
        """Fetch ``shards`` into the node cache in the background (streamed data only)."""
        if self.stream is not None and not (self._prefetching and self._prefetching.is_alive()):
            todo = [self.shard_meta[i] for i in shards]
            self._prefetching = threading.Thread(target=self._fetch, args=(todo,), daemon=True, name="prefetch")
            self._prefetching.start()

    def _fetch(self, shards: list[dict]) -> None:
        for shard in shards:
            try:
                _, fd = self.stream.open(shard)
                os.close(fd)
            except Exception:  # noqa: BLE001 - a failed prefetch is retried, and reported, by the read
                return


    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        out, pos, i = [], start, int(np.searchsorted(self.starts, start, side="right") - 1)
        while length > 0:
            a = self._array(i)
            off = pos - int(self.starts[i])
            take = min(length, len(a) - off)
            out.append(a[off: off + take])
            pos, length, i = pos + take, length - take, i + 1
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])


def _map(uri: str, path: str, shard: dict) -> np.ndarray:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.uint16 or arr.ndim != 1 or len(arr) != shard["tokens"]:
        raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} has the wrong shape or dtype")
    return arr


def _to_batch(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(np.stack(windows).astype(np.int64))
    return data[:, :-1], data[:, 1:]


class SequenceSampler:
    """Training windows of ``seq_len + 1`` tokens in a seeded order; state = sequences consumed.

    ``block_shards=0``: each epoch is one permutation of every window of the split. ``block_shards=K``:
    the windows are cut into blocks of K shards' worth of consecutive windows; each epoch permutes the
    blocks, then the windows within each block, so a stretch of training reads only about K + 1 shards
    (a corpus larger than a node's disk streams through its cache a block at a time)."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, block_shards: int = 0):
        self.shards, self.seq_len, self.seed, self.block_shards = shards, seq_len, seed, block_shards
        self.n_windows = (len(shards) - 1) // seq_len
        require(self.n_windows >= 1, f"the train split has {len(shards)} tokens, fewer than one sequence of "
                                     f"data.seq_len={seq_len}; lower data.seq_len or add data")
        require(block_shards >= 0, f"data.block_shards must be >= 0, got {block_shards}")
        self.consumed = 0
        self._recent: OrderedDict[tuple, object] = OrderedDict()
        if block_shards:
            shard_tokens = max(s["tokens"] for s in shards.shard_meta)
            self.block_windows = max(1, min(self.n_windows, block_shards * shard_tokens // seq_len))
            self.n_blocks = -(-self.n_windows // self.block_windows)
            # a batch may straddle two blocks, each over up to K + 1 shards: all of them stay pinned
            shards.max_open = 2 * (block_shards + 1)
            self._block_at: tuple[int, int] | None = None  # (epoch, position in its block order) last read

    def _memo(self, key: tuple, make):
        """A few recent orders, kept on the sampler (a cache on the class would keep old samplers, and
        their pinned shards, alive)."""
        if key in self._recent:
            self._recent.move_to_end(key)
        else:
            self._recent[key] = make()
            if len(self._recent) > 6:
                self._recent.popitem(last=False)
        return self._recent[key]

    def _order(self, epoch: int) -> np.ndarray:
        return self._memo(("order", epoch),
                          lambda: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))

    def _blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's block order and, for each position in it, the epoch position its block begins at."""
        def make():
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_blocks)
            sizes = np.minimum(self.block_windows, self.n_windows - order * self.block_windows)
            return order, np.cumsum(sizes) - sizes
        return self._memo(("blocks", epoch), make)

    def _within(self, epoch: int, block: int) -> np.ndarray:
        size = min(self.block_windows, self.n_windows - block * self.block_windows)
        return self._memo(("within", epoch, block),
                          lambda: np.random.default_rng([self.seed, epoch, 1, block]).permutation(size))

    def _block_shards(self, block: int) -> range:
        tokens = self.block_windows * self.seq_len
        return self.shards.shards_of(block * tokens, tokens + 1)

    def window_index(self, global_index: int) -> int:
        """Which window of the split the ``global_index``-th sequence of the run reads."""
        epoch, i = divmod(global_index, self.n_windows)
        if not self.block_shards:
            return int(self._order(epoch)[i])
        order, begins = self._blocks(epoch)
        k = int(np.searchsorted(begins, i, side="right")) - 1
        block = int(order[k])
        if (epoch, k) != self._block_at:  # a new block: unpin all but it and the last one (a batch may
            # straddle the two), and fetch the next one's shards while this one is read
            last = self._block_at
            self._block_at = (epoch, k)
            keep = set(self._block_shards(block))
            if last is not None:
                keep |= set(self._block_shards(int(self._blocks(last[0])[0][last[1]])))
            self.shards.keep_only(keep)
            nxt = int(order[k + 1]) if k + 1 < len(order) else int(self._blocks(epoch + 1)[0][0])
            self.shards.prefetch(self._block_shards(nxt))
        return block * self.block_windows + int(self._within(epoch, block)[i - int(begins[k])])

    def _window(self, global_index: int) -> np.ndarray:
        return self.shards.window(self.window_index(global_index) * self.seq_len, self.seq_len + 1)

    def next_batch(self, global_sequences: int, first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``first .. first + count`` of the next global batch (default: all of it); every rank
        advances by the global amount, so the data order does not depend on the world size."""
        count = global_sequences - first if count is None else count
        require(0 <= first and count >= 1 and first + count <= global_sequences,
                f"sequences {first}..{first + count} are not in a global batch of {global_sequences}")
        start = self.consumed + first
        self.consumed += global_sequences
        return _to_batch([self._window(start + j) for j in range(count)])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "consumed_sequences": self.consumed,
                "block_shards": self.block_shards}

    def load_state_dict(self, state: dict) -> None:
        require(state["seed"] == self.seed and state["seq_len"] == self.seq_len,
                f"checkpoint sampler (seed {state['seed']}, seq_len {state['seq_len']}) does not match the run "
                f"(seed {self.seed}, seq_len {self.seq_len})")
        saved = int(state.get("block_shards", 0))
        require(saved == self.block_shards,
                f"checkpoint sampler read in blocks of {saved} shards (0: one permutation), the run in blocks "
                f"of {self.block_shards}: data.block_shards must stay the same across a run")
        self.consumed = int(state["consumed_sequences"])


def eval_batches(shards: TokenShards, seq_len: int, max_tokens: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1):
    """A fixed set of validation windows spread over the split, in micro-batches; rank ``r`` takes every
    W-th micro-batch, so each micro-batch is the same at every world size (an MoE's routing capacity
    depends on what it shares a batch with)."""
    n_available = (len(shards) - 1) // seq_len
    require(n_available >= 1, f"the val split is shorter than one sequence of data.seq_len={seq_len}")
    n = max(1, min(n_available, max_tokens // seq_len))
    starts = [(k * n_available // n) * seq_len for k in range(n)]
    try:
        for i in list(range(0, len(starts), micro_batch))[rank::world_size]:
            yield _to_batch([shards.window(s, seq_len + 1) for s in starts[i: i + micro_batch]])
    finally:
        shards.keep_only(set())  # streamed: the validation shards are not needed until the next evaluation


class TokenData:
    """The Trainer's data for language models: the train split through the sampler, a fixed set of
    validation windows. Counts in tokens: one example (a window) is ``seq_len`` units."""

    def __init__(self, uri: str, seq_len: int, seed: int, verify: bool = True, cache_dir: str | None = None,
                 cache_max_gb: float | None = None, block_shards: int = 0):
        streamed = block_shards > 0
        self.train = TokenShards(uri, "train", verify, cache_dir, cache_max_gb, streamed)
        self.val = TokenShards(uri, "val", verify, cache_dir, cache_max_gb, streamed)
        if self.train.stream is not None:  # what one process may pin: two blocks, the next one, two val shards
            shard_bytes = 2 * max(s["tokens"] for s in self.train.shard_meta + self.val.shard_meta) + 128
            need = (3 * (block_shards + 1) + 2) * shard_bytes
            require(need <= cache_max_gb * 1e9,
                    f"data.cache_max_gb={cache_max_gb:g} is too small to stream blocks of data.block_shards="
                    f"{block_shards} shards ({need / 1e9:.3f} GB at least: 3 x (block + 1) + 2 shards of "
                    f"{shard_bytes / 1e9:.3f} GB); raise it or lower data.block_shards")
        self.sampler = SequenceSampler(self.train, seq_len, seed, block_shards)
        self.units_per_example = seq_len

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    def next_batch(self, global_examples: int, first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch(global_examples, first, count)

    def eval_batches(self, max_units: int, micro_batch: int, rank: int = 0, world_size: int = 1):
        return eval_batches(self.val, self.units_per_example, max_units, micro_batch, rank, world_size)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def close(self) -> None:
        """Unpin streamed shards now (they are unpinned when the data is dropped, too)."""
        self.train.close()
        self.val.close()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
