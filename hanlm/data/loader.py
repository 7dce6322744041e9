"""Split a flat token array into training windows and yield them as (x, y) batches, per rank."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hanlm.errors import CheckpointError, ConfigError, DataError

# Fields a resumed loader must share with the one that wrote the state; a mismatch
# would silently change which windows each rank sees.
_CONFIG_FIELDS = ("block_size", "micro_batch", "world_size", "rank", "seed", "shuffle")


class BatchLoader:
    """Yields (x, y) int64 torch tensors of shape (micro_batch, block_size); y is x shifted by one token.

    The array is cut into `num_windows = (len(tokens) - 1) // block_size` windows; window i
    covers tokens[i*T : i*T + T + 1], so the x ranges never overlap. Each epoch e orders the
    windows by a permutation seeded by (seed, e) (identity when shuffle=False). The
    permutation depends only on seed and epoch, so every rank computes the same one.

    Only the first `batches_per_epoch * world_size * micro_batch` windows of that order are
    used, so every rank runs the same number of full batches; rank r takes every
    world_size-th of them starting at r. The ranks' windows are therefore disjoint and
    together cover the used windows exactly once. At most world_size*micro_batch - 1
    windows are left out per epoch, and with shuffling a different few each epoch.

    Iteration is infinite (training counts steps, not epochs); `epoch_batches()` yields just
    the rest of the current epoch. `state_dict()` / `load_state_dict()` resume exactly.

    `tokens` may also be a sequence of K arrays, encodings of the same text that differ (the train
    split's BPE-dropout copies): epoch e then reads array e mod K, and `tokens`, `num_windows` and
    `batches_per_epoch` are the current epoch's.
    """

    def __init__(
        self,
        tokens: np.ndarray | Sequence[np.ndarray],
        block_size: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        # A list or tuple holds one array per epoch of a cycle; anything else (a memmap, TokenShards) is one array.
        self.copies = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        if not self.copies:
            raise DataError("tokens is an empty sequence: give one token array, or one per epoch of a cycle")
        for copy in self.copies:
            if copy.ndim != 1:
                raise DataError(f"tokens must be a flat 1-D array of token ids, got shape {copy.shape}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {micro_batch}")
        if world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}) for world_size={world_size}, got {rank}")
        self.block_size = block_size
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._num_windows = [max(len(copy) - 1, 0) // block_size for copy in self.copies]
        for copy, windows in zip(self.copies, self._num_windows):
            if windows // (world_size * micro_batch) == 0:
                need = world_size * micro_batch * block_size + 1
                raise DataError(
                    f"{len(copy)} tokens are too few for one step: world_size={world_size} x "
                    f"micro_batch={micro_batch} x block_size={block_size} needs {need} tokens; "
                    "add data or lower micro_batch or block_size"
                )
        self.epoch: int = 0
        self._batch = 0  # index of the next batch within the epoch, always < batches_per_epoch
        self._starts_epoch = -1
        self._starts = np.empty(0, dtype=np.int64)

    @property
    def tokens(self) -> np.ndarray:
        """The token array the current epoch reads."""
        return self.copies[self.epoch % len(self.copies)]

    @property
    def num_windows(self) -> int:
        """Windows of the current epoch's array."""
        return self._num_windows[self.epoch % len(self.copies)]

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank takes in the current epoch."""
        return self.num_windows // (self.world_size * self.micro_batch)

    def _rank_starts(self) -> np.ndarray:
        """Token offsets of this rank's windows for the current epoch, in order; cached per epoch."""
        if self._starts_epoch != self.epoch:
            usable = self.batches_per_epoch * self.world_size * self.micro_batch
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)[:usable]
            else:
                order = np.arange(usable, dtype=np.int64)
            self._starts = order[self.rank :: self.world_size] * self.block_size  # (batches_per_epoch * B,)
            self._starts_epoch = self.epoch
        return self._starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) batch, moving on to the next epoch after the last batch of this one."""
        B, T, batches = self.micro_batch, self.block_size, self.batches_per_epoch
        starts = self._rank_starts()[self._batch * B : (self._batch + 1) * B]  # (B,)
        # One gather of just the B*(T+1) tokens needed, one widening copy; x and y are views of it.
        t = torch.from_numpy(self.tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64))  # (B, T+1)
        # What identifies each row whatever the ranks: a masked objective seeds each row's masks by it.
        self.last_rows = [(self.epoch, int(s)) for s in starts]
        self._batch += 1
        if self._batch == batches:
            self.epoch += 1
            self._batch = 0
        return t[:, :-1], t[:, 1:]  # (B, T), (B, T)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The remaining batches of the current epoch (all of them if it has not started)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | list[int]]:
        """Position plus the fields that must match on resume; plain ints (and, over several arrays, a list
        of each one's length), safe for weights_only loads."""
        copies = {"copy_tokens": self._copy_tokens()} if len(self.copies) > 1 else {}
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "num_tokens": len(self.copies[0]),
            **copies,
            **{name: int(getattr(self, name)) for name in _CONFIG_FIELDS},
        }

    def _copy_tokens(self) -> list[int]:
        return [len(copy) for copy in self.copies]

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; raise if it came from a loader over other data or settings."""
        missing = [k for k in ("epoch", "batch", "num_tokens", *_CONFIG_FIELDS) if k not in state]
        if missing:
            raise CheckpointError(f"loader state lacks {', '.join(missing)}; it was not saved by BatchLoader")
        theirs = list(state.get("copy_tokens", [state["num_tokens"]]))
        if theirs != self._copy_tokens():
            raise DataError(
                f"loader state is for {_spelled(theirs)} but the data has {_spelled(self._copy_tokens())}; "
                "resume on the same token shards"
            )
        for name in _CONFIG_FIELDS:
            ours = int(getattr(self, name))
            if state[name] != ours:
                raise ConfigError(
                    f"loader state has {name}={state[name]} but this loader has {name}={ours}; "
                    f"resume with the same {name} or start a new run"
                )
        batches = self._num_windows[state["epoch"] % len(self.copies)] // (self.world_size * self.micro_batch)
        if state["epoch"] < 0 or not 0 <= state["batch"] < batches:
            raise CheckpointError(
                f"loader state has epoch={state['epoch']}, batch={state['batch']}, "
                f"outside an epoch of {batches} batches; the checkpoint is corrupt"
            )
        self.epoch = state["epoch"]
        self._batch = state["batch"]


def _spelled(lengths: list[int]) -> str:
    """Token counts as an error names them: `N tokens` for one array, else the count of each."""
    return f"{lengths[0]} tokens" if len(lengths) == 1 else f"{len(lengths)} arrays of {lengths} tokens"
