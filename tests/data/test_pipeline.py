import numpy as np
import pytest

from jsft.data import packing
from jsft.data.pipeline import TrainBatches, eval_batches


def _examples(n):
    rng = np.random.default_rng(0)
    return [
        packing.Example(np.full(int(k), i, np.int32), np.array([False] + [True] * (int(k) - 1)))
        for i, k in enumerate(rng.integers(3, 9, n))
    ]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_restored_iterator_continues_with_exactly_the_same_batches():
    a = TrainBatches(_examples(50), 16, 4, seed=3)
    first = _take(a, 7)  # crosses an epoch boundary
    assert a.epoch >= 1
    state = a.state()
    rest = _take(a, 6)
    b = TrainBatches(_examples(50), 16, 4, seed=3)
    b.restore(state)
    for x, y in zip(rest, _take(b, 6), strict=True):
        for k in packing.ROW_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert first  # the batches before the checkpoint are not replayed: b started at `state`
    with pytest.raises(ValueError, match="seed"):
        TrainBatches(_examples(50), 16, 4, seed=4).restore(state)


def test_epochs_reshuffle_and_hosts_get_disjoint_slices():
    it = TrainBatches(_examples(50), 16, 4, seed=0)
    n = it.batches_per_epoch()
    e0, e1 = _take(it, n), _take(it, n)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(e0, e1, strict=True))
    full = next(TrainBatches(_examples(50), 16, 4, seed=0))
    halves = [
        next(TrainBatches(_examples(50), 16, 4, seed=0, process_index=i, process_count=2)) for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), full["inputs"])


def test_too_little_data_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(TrainBatches(_examples(3), 64, 8, seed=0))


def test_eval_batches_cover_every_example_once_and_pad_with_empty_rows():
    exs = _examples(20)
    batches = eval_batches(exs, 16, 4)
    assert all(len(b["inputs"]) == 4 for b in batches)
    total = sum(int(b["loss_mask"].sum()) for b in batches)
    assert total == sum(int(ex.mask[1:].sum()) for ex in exs)
