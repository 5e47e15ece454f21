"""The streaming engine (config.data.engine="stream"): shards before parsing, disjoint per-host
reading, exact resume, elastic resume over process counts, the windowed shuffle, bad records."""

import json

import datasets
import ml_collections
import numpy as np
import pytest

from jsft.data import packing, shards, shuffle
from jsft.data.batches import merge_states
from jsft.data.pipeline import build_data
from jsft.data.sources import DataError
from tests.conftest import make_records, write_jsonl
from tests.data.test_pipeline import _chat_records, _config


@pytest.fixture(scope="module")
def stream_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_sources")
    write_jsonl(d / "pr.jsonl", make_records(160, 0))
    write_jsonl(d / "pr_val.jsonl", make_records(10, 1))
    # Small row groups: the Parquet source is cut into 6 shards.
    datasets.Dataset.from_list(_chat_records(60, 2)).to_parquet(str(d / "chat.parquet"), batch_size=10)
    return d


def _stream_config(d, **data):
    from configs.demo import source

    srcs = ml_collections.ConfigDict(
        {
            "pr": source(str(d / "pr.jsonl"), str(d / "pr_val.jsonl"), weight=2.0),
            "chat": source(str(d / "chat.parquet"), weight=1.0),
        }
    )
    opts = {"template": "chatml", "pack_chunk_examples": 16, "seq_len": 64, "engine": "stream"}
    opts.update(shard_bytes=2000, shuffle_window=8, workers=0, batch_size=4)
    return _config(d, srcs, **{**opts, **data})


def _hosts(config, tmp_path, count, tag):
    # Simulated hosts: the same build a process of a `count`-process run makes (the tokenizer is
    # trained once, in the first host's workdir, and reused: every process loads the same one).
    first = build_data(config.data, 0, str(tmp_path / tag), 0, count)
    config.data.tokenizer = str(tmp_path / tag / "tokenizer.model")
    rest = [build_data(config.data, 0, str(tmp_path / f"{tag}{i}"), i, count) for i in range(1, count)]
    config.data.tokenizer = ""
    return [first, *rest]


def _global(hosts):
    parts = [next(h.train) for h in hosts]
    return {k: np.concatenate([p[k] for p in parts]) for k in packing.ROW_KEYS}


def _assert_same(a, b):
    for k in packing.ROW_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jsonl_byte_ranges_hold_every_record_once_whatever_the_shard_size(tmp_path):
    lines = [json.dumps({"i": i, "x": "y" * (i % 37)}) for i in range(200)]
    lines[7], lines[50], lines[51] = "", "\r", "   "  # blank lines (whitespace-only is read as blank)
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(data)
    expected, offset = [], 0
    for line in data.split(b"\n")[:-1]:
        if line not in (b"", b"\r"):
            expected.append(offset)
        offset += len(line) + 1
    for shard_bytes in (1, 13, 1000, 1 << 20):
        got = [
            o for s in shards.plan(str(tmp_path / "a.jsonl"), shard_bytes) for o in shards.jsonl_offsets(s)
        ]
        assert got == expected, shard_bytes
    assert shards.line_number(str(tmp_path / "a.jsonl"), expected[60]) == 1 + data[: expected[60]].count(
        b"\n"
    )


def test_the_windowed_shuffle_is_a_seeded_permutation_that_mixes_within_and_across_windows():
    n, window = 103, 10
    order = [shuffle.windowed_index(p, n, window, (1, 0, 0, 0)) for p in range(n)]
    assert sorted(order) == list(range(n))  # each item exactly once per epoch
    assert order == [shuffle.windowed_index(p, n, window, (1, 0, 0, 0)) for p in range(n)]
    assert order != [shuffle.windowed_index(p, n, window, (1, 0, 0, 1)) for p in range(n)]  # next epoch
    assert order[:10] != sorted(order[:10]) and order[:10] != list(range(10))
    for w in range(10):  # a window's positions hold the items of one window of the source
        assert len({i // window for i in order[w * window : (w + 1) * window]}) == 1
    assert sorted(order[100:]) == [100, 101, 102]  # the partial last window stays last
    full = [shuffle.windowed_index(p, n, 0, (1, 0, 0, 0)) for p in range(n)]  # window 0: whole
    assert (
        sorted(full) == list(range(n)) and max(abs(a - b) for a, b in zip(full, range(n), strict=True)) > 50
    )


def test_each_host_reads_only_its_own_shards_and_they_cover_the_sources(stream_sources, tmp_path):
    config = _stream_config(stream_sources, num_shards=4)
    hosts = _hosts(config, tmp_path, 2, "h")
    for k, n in enumerate((60, 160)):  # chat (Parquet row groups), pr (JSONL byte ranges)
        owned = [
            {(sh.path, sh.start) for st in h.train.streams.values() for sh in st.spec.sources[k].shards}
            for h in hosts
        ]
        assert owned[0] and owned[1] and not owned[0] & owned[1]
        assert sum(h.train_sources[k].stats["records"] for h in hosts) == n
    assert sorted(hosts[0].train.streams) == [0, 1] and sorted(hosts[1].train.streams) == [2, 3]
    assert next(hosts[0].train)["inputs"].shape == (2, 64)  # its half of the global batch


def test_a_restored_stream_sees_exactly_the_batches_of_an_uninterrupted_one(stream_sources, tmp_path):
    config = _stream_config(stream_sources)
    data = build_data(config.data, 0, str(tmp_path / "a"))
    for _ in range(5):
        next(data.train)
    state = json.loads(json.dumps(data.train.state()))  # as a checkpoint stores it
    expected = [next(data.train) for _ in range(12)]  # past several pack chunks and epochs
    again = build_data(config.data, 0, str(tmp_path / "a"))
    again.train.restore(state)
    for want in expected:
        _assert_same(next(again.train), want)
    epochs = data.epochs(data.train.state())
    assert set(epochs) == {"chat", "pr"} and min(epochs.values()) > 0.2  # per-source epochs advance


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (4, 2)])
def test_a_run_checkpointed_on_n_processes_resumes_bitwise_on_m(stream_sources, tmp_path, before, after):
    # Logical streams (config.data.num_shards) are dealt whole to processes: resuming on another
    # process count moves whole streams, so the global batches go on exactly as they would have.
    config = _stream_config(stream_sources, num_shards=4)
    single = _hosts(config, tmp_path, 1, "single")
    old = _hosts(config, tmp_path, before, "old")
    for _ in range(4):
        _assert_same(_global(old), next(single[0].train))
    state = json.loads(json.dumps(merge_states([h.train.state() for h in old])))
    assert state == single[0].train.state()
    new = _hosts(config, tmp_path, after, "new")
    for h in new:
        h.train.restore(state)
    for _ in range(8):
        _assert_same(_global(new), next(single[0].train))


def test_resuming_on_a_process_count_that_cannot_hold_the_streams_is_refused(stream_sources, tmp_path):
    config = _stream_config(stream_sources, num_shards=4)
    with pytest.raises(ValueError, match="num_shards=4 must be a multiple of the 3 processes"):
        build_data(config.data, 0, str(tmp_path / "x"), 0, 3)
    data = build_data(_stream_config(stream_sources, num_shards=2).data, 0, str(tmp_path / "y"))
    state = data.train.state()
    other = build_data(config.data, 0, str(tmp_path / "y"))
    with pytest.raises(ValueError, match="set config.data.num_shards=2"):
        other.train.restore(state)


@pytest.mark.slow  # ~10 s: starting two worker processes
def test_the_order_is_the_same_with_two_grain_workers_as_with_none(stream_sources, tmp_path):
    base = build_data(_stream_config(stream_sources).data, 0, str(tmp_path / "k"))
    expected = [next(base.train) for _ in range(10)]
    config = _stream_config(stream_sources, workers=2)
    config.data.tokenizer = str(tmp_path / "k" / "tokenizer.model")
    config.data.sources.pr.val_path = ""  # the workers' part only
    two = build_data(config.data, 0, str(tmp_path / "k2"))
    try:
        for want in expected:
            _assert_same(next(two.train), want)
    finally:
        two.train.close()


def test_a_sorted_source_is_drawn_mixed(tmp_path):
    # A file sorted by length: without a shuffle the first batches would hold only the shortest.
    records = sorted(make_records(400, 5), key=lambda r: len(r["prompt"]) + len(r["response"]))
    for i, r in enumerate(records):
        r["prompt"] = f"{i:04d} {r['prompt']}"
    write_jsonl(tmp_path / "sorted.jsonl", records)
    from configs.demo import source

    srcs = ml_collections.ConfigDict({"s": source(str(tmp_path / "sorted.jsonl"))})
    config = _config(
        tmp_path, srcs, engine="stream", shard_bytes=4000, shuffle_window=32, pack_chunk_examples=64
    )
    config.data.num_shards = 1
    data = build_data(config.data, 0, str(tmp_path / "w"))
    stream = data.train.streams[0]
    sampler = stream.spec.sampler()
    drawn = [sampler.next()[1] for _ in range(64)]
    assert sorted(drawn) != drawn and max(drawn) > 200  # spread over the file, not its start


def test_bad_records_name_file_and_line_and_are_counted_across_hosts(tmp_path):
    lines = [json.dumps(r) for r in make_records(60, 3)]
    lines[4] = '{"prompt": "a", "response": '
    lines[40] = '{"prompt": "a"}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    from configs.demo import source

    srcs = ml_collections.ConfigDict({"b": source(str(tmp_path / "bad.jsonl"))})
    opts = {
        "engine": "stream",
        "shard_bytes": 500,
        "shuffle_window": 0,
        "pack_chunk_examples": 60,
        "num_shards": 2,
    }
    config = _config(tmp_path, srcs, **opts)
    with pytest.raises(DataError, match=r"bad\.jsonl:(5|41): ") as e:
        hosts = _hosts(config, tmp_path, 2, "e")
        for _ in range(40):
            _global(hosts)
    assert "on_bad_record='skip'" in str(e.value)
    config.data.on_bad_record = "skip"
    hosts = _hosts(config, tmp_path, 2, "s")
    for _ in range(40):  # several epochs of 60 records
        _global(hosts)
    bad = sum(sh["bad"][0] for sh in merge_states([h.train.state() for h in hosts])["shards"].values())
    assert bad >= 2 and bad % 2 == 0  # both bad lines, once per epoch, over both hosts


def test_settings_the_stream_cannot_honour_are_refused_by_name(stream_sources, tmp_path):
    config = _stream_config(stream_sources)
    config.data.sources.chat.val_fraction = 0.1
    with pytest.raises(DataError, match=r"sources\.chat\.val_fraction.*give a val_path"):
        build_data(config.data, 0, str(tmp_path / "v"))
    config = _stream_config(stream_sources)
    config.data.sources.chat.format = "prompt_response"  # the Parquet file holds `messages`
    with pytest.raises(DataError, match=r"needs the column\(s\) \['prompt', 'response'\]"):
        build_data(config.data, 0, str(tmp_path / "c"))


def test_mixture_rules_weigh_the_streamed_sources_by_their_records(stream_sources, tmp_path):
    capped = build_data(
        _stream_config(stream_sources, mixture="examples", mixture_cap=60).data, 0, str(tmp_path)
    )
    assert capped.mixture == pytest.approx({"pr": 0.5, "chat": 0.5})  # 160 records capped at 60, and 60
    hot = build_data(
        _stream_config(stream_sources, mixture="temperature", mixture_temperature=2.0).data, 0, str(tmp_path)
    )
    assert hot.mixture["pr"] == pytest.approx(160**0.5 / (160**0.5 + 60**0.5))
    rows = np.concatenate([next(capped.train)["source_ids"] for _ in range(30)])
    share = (rows == 2).sum() / (rows > 0).sum()  # source_ids: 1 + index in name order (chat, pr)
    assert 0.3 < share < 0.8


def test_large_ranges_shuffle_with_grains_index_shuffle_as_a_permutation():
    n = shuffle.SMALL + 1000  # above SMALL: grain's index_shuffle, O(1) memory
    order = np.array([shuffle.windowed_index(p, n, 0, (3, 1, 0, 0)) for p in range(n)])
    assert np.array_equal(np.sort(order), np.arange(n)) and not np.array_equal(order, np.arange(n))


def test_the_record_index_is_cached_and_a_changed_file_is_indexed_again(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_records(30, 0))
    (shard,) = shards.plan(str(tmp_path / "a.jsonl"), 1 << 20)
    cache = str(tmp_path / "cache")
    first = shards.cached_offsets(shard, cache)
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 1
    np.testing.assert_array_equal(shards.cached_offsets(shard, cache), first)
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write(json.dumps(make_records(1, 1)[0]) + "\n")
    (grown,) = shards.plan(str(tmp_path / "a.jsonl"), 1 << 20)
    assert len(shards.cached_offsets(grown, cache)) == 31
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2
