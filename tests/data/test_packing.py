import numpy as np
import pytest

from jsft.data import packing


def _ex(n_prompt, n_resp, start=1):
    ids = np.arange(start, start + n_prompt + n_resp, dtype=np.int32)
    return packing.Example(ids, np.array([False] * n_prompt + [True] * n_resp))


def test_best_fit_puts_each_item_in_the_tightest_open_bin():
    # capacity 10: [6] -> bin0 (room 4); [5] -> bin1 (room 5); [4] -> bin0 (tightest fit, room 0)
    assert packing.best_fit_bins([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="outside"):
        packing.best_fit_bins([11], 10)


def test_rows_hold_every_example_once_with_restarting_positions():
    rng = np.random.default_rng(0)
    examples = [_ex(int(rng.integers(1, 6)), int(rng.integers(1, 6)), start=100 * i) for i in range(30)]
    rows = packing.pack(examples, 16)
    seen = []
    for r in range(len(rows["inputs"])):
        segs = rows["segment_ids"][r]
        for s in sorted(set(segs) - {0}):
            idx = np.flatnonzero(segs == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
            assert np.array_equal(rows["positions"][r, idx], np.arange(len(idx)))
            seen.append(int(rows["inputs"][r, idx[0]]) // 100)
            # targets are the next token of the same example
            assert np.array_equal(rows["targets"][r, idx], rows["inputs"][r, idx] + 1)
        pad = segs == 0
        assert not rows["loss_mask"][r, pad].any()
    assert sorted(seen) == list(range(30))
    total_positions = sum(len(ex.ids) - 1 for ex in examples)
    assert (rows["segment_ids"] > 0).sum() == total_positions
    assert rows["loss_mask"].sum() == sum(ex.mask[1:].sum() for ex in examples)


def test_over_long_examples_follow_the_policy():
    long_reply = _ex(3, 20)
    cut, cut_mask, truncated = packing.fit_ids(
        long_reply.ids.tolist(), long_reply.mask.tolist(), 10, "truncate"
    )
    assert truncated and len(cut) == 11 and cut[:3] == [1, 2, 3] and any(cut_mask[1:])  # keeps the start
    long_prompt = _ex(12, 3)  # only prompt survives truncation: nothing to train, so it is dropped
    assert packing.fit_ids(long_prompt.ids.tolist(), long_prompt.mask.tolist(), 10, "truncate") == (
        [],
        [],
        True,
    )
    short = _ex(2, 3)
    assert packing.fit_ids(short.ids.tolist(), short.mask.tolist(), 10, "truncate")[2] is False

    ids, mask = list(range(20)), [False] * 15 + [True] * 5
    left, lmask, truncated = packing.fit_ids(ids, mask, 10, "truncate_prompt")
    assert truncated and left == [0] + list(range(10, 20)) and lmask[-5:] == [True] * 5
    assert packing.fit_ids(ids, mask, 10, "drop") == ([], [], True)
    assert packing.fit_ids(ids[:8], mask[:8], 10, "drop") == (ids[:8], mask[:8], False)
    # The response alone is too long: drop the prompt, then cut the end of the response.
    long_resp, lr_mask, _ = packing.fit_ids(ids, [False] * 2 + [True] * 18, 10, "truncate_prompt")
    assert long_resp == [0] + list(range(2, 12))


def test_pad_mode_gives_each_example_a_row_and_stats_show_the_difference():
    examples = [_ex(2, 3, start=10 * i) for i in range(8)]
    packed, padded = packing.pack(examples, 16), packing.pack(examples, 16, mode="pad")
    assert len(padded["inputs"]) == 8 and len(packed["inputs"]) == 2  # 4 positions each, 4 per row
    sp, sd = packing.packing_stats(packed), packing.packing_stats(padded)
    assert sd["examples_per_row"] == 1.0 and sp["examples_per_row"] == 4.0
    assert sp["non_pad_fraction"] == 1.0 and sd["non_pad_fraction"] == pytest.approx(4 / 16)
    assert sd["target_fraction"] == pytest.approx(8 * 3 / (8 * 16))
    assert (packed["source_ids"][packed["segment_ids"] > 0] == 1).all()
    with pytest.raises(ValueError, match="config.data.packing"):
        packing.pack(examples, 16, mode="concat")
