"""Memory-mapped token shards and a sampler whose order depends only on (seed, sequences consumed).

The global order of training windows is a seeded permutation per epoch. Global step ``s`` takes the
next ``B`` windows of that order; rank ``r`` of ``W`` takes the ``r``-th contiguous slice of them.
So the set of sequences in every global batch is the same for any world size, and a run resumed —
on the same or a different number of workers, with the same or a larger batch — continues exactly
where it stopped.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from ..core.errors import ConfigError, require
from ..integrations.storage import filesystem, is_local
from .cache import (CorruptDataError, cached_shards, default_cache_dir, file_sha256, local_verified,
                    mark_local_verified)
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
                 cache_max_gb: float | None = None):
        meta = read_meta(uri)
        if meta is None:
            raise ConfigError(f"data.uri {uri}: no prepared data (meta.json missing); run "
                              f"`python -m progrow_ray.data prepare --source SOURCE --out {uri}`")
        require(meta.get("format") == FORMAT, f"data.uri {uri}: unknown format {meta.get('format')!r}")
        require(split in meta["splits"], f"data.uri {uri}: no split {split!r}")
        self.meta, self.split = meta, split
        fs, root = filesystem(uri)
        self.lease = None  # a remote dataset: this node's cached copy, pinned while the shards are open
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
        self.arrays: list[np.ndarray] = []
        for shard in meta["splits"][split]["shards"]:
            path = os.path.join(root, shard["file"])
            if verify:
                _check_sha(uri, root, shard)
            elif not os.path.exists(path):
                raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} is missing; re-run prepare")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype != np.uint16 or arr.ndim != 1 or len(arr) != shard["tokens"]:
                raise CorruptDataError(f"data.uri {uri}: shard {shard['file']} has the wrong shape or dtype")
            self.arrays.append(arr)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])


    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        out, pos, i = [], start, int(np.searchsorted(self.starts, start, side="right") - 1)
        while length > 0:
            a = self.arrays[i]
            off = pos - int(self.starts[i])
            take = min(length, len(a) - off)
            out.append(a[off: off + take])
            pos, length, i = pos + take, length - take, i + 1
        return np.concatenate(out) if len(out) > 1 else np.asarray(out[0])


def _to_batch(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(np.stack(windows).astype(np.int64))
    return data[:, :-1], data[:, 1:]


class SequenceSampler:
    """Training windows of ``seq_len + 1`` tokens in a seeded order; state = sequences consumed."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.n_windows = (len(shards) - 1) // seq_len
        require(self.n_windows >= 1, f"the train split has {len(shards)} tokens, fewer than one sequence of "
                                     f"data.seq_len={seq_len}; lower data.seq_len or add data")
        self.consumed = 0

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _window(self, global_index: int) -> np.ndarray:
        epoch, i = divmod(global_index, self.n_windows)
        start = int(self._order(epoch)[i]) * self.seq_len
        return self.shards.window(start, self.seq_len + 1)

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
        return {"seed": self.seed, "seq_len": self.seq_len, "consumed_sequences": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        require(state["seed"] == self.seed and state["seq_len"] == self.seq_len,
                f"checkpoint sampler (seed {state['seed']}, seq_len {state['seq_len']}) does not match the run "
                f"(seed {self.seed}, seq_len {self.seq_len})")
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
    for i in list(range(0, len(starts), micro_batch))[rank::world_size]:
        yield _to_batch([shards.window(s, seq_len + 1) for s in starts[i: i + micro_batch]])


class TokenData:
    """The Trainer's data for language models: the train split through the sampler, a fixed set of
    validation windows. Counts in tokens: one example (a window) is ``seq_len`` units."""

    def __init__(self, uri: str, seq_len: int, seed: int, verify: bool = True, cache_dir: str | None = None,
                 cache_max_gb: float | None = None):
        self.train = TokenShards(uri, "train", verify, cache_dir, cache_max_gb)
        self.val = TokenShards(uri, "val", verify, cache_dir, cache_max_gb)
        self.sampler = SequenceSampler(self.train, seq_len, seed)
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

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
