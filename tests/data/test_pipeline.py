import glob
import json
import os

import datasets
import numpy as np
import pytest

from jsft.data import packing
from jsft.data.batches import Prefetcher, merge_states
from jsft.data.pipeline import build_data
from jsft.data.sources import DataError
from tests import tiny_config
from tests.conftest import make_records, write_jsonl


def _chat_records(n, seed):
    out = []
    for r in make_records(n, seed):
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "shout"},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
        )
    return out


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_sources")
    write_jsonl(d / "pr.jsonl", make_records(120, 0))
    write_jsonl(d / "pr_val.jsonl", make_records(10, 1))
    datasets.Dataset.from_list(_chat_records(60, 2)).to_parquet(str(d / "chat.parquet"))
    return d


def _config(data_dir, sources, **data):
    config = tiny_config.get_config(str(data_dir))
    del config.data["sources"]
    config.data.sources = sources
    config.data.update(data)
    return config


def _two_source_config(d, **data):
    import ml_collections

    from configs.demo import source

    srcs = ml_collections.ConfigDict(
        {
            "pr": source(str(d / "pr.jsonl"), str(d / "pr_val.jsonl"), weight=2.0),
            "chat": source(str(d / "chat.parquet"), weight=1.0, val_fraction=0.2),
        }
    )
    return _config(d, srcs, **{"template": "chatml", "pack_chunk_examples": 16, "seq_len": 64, **data})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_restored_iterator_sees_exactly_the_batches_of_an_uninterrupted_run(two_sources, tmp_path):
    config = _two_source_config(two_sources)
    a = build_data(config.data, 0, str(tmp_path))
    assert a.mixture == pytest.approx({"chat": 1 / 3, "pr": 2 / 3})
    _take(a.train, 9)  # several pack chunks of 16 examples each
    state = json.loads(json.dumps(a.train.state()))  # as the checkpoint stores it
    expected = _take(a.train, 6)
    b = build_data(config.data, 0, str(tmp_path))
    b.train.restore(state)
    for x, y in zip(expected, _take(b.train, 6), strict=True):
        for k in packing.ROW_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert {1, 2} <= set(np.unique(expected[0]["source_ids"]))  # sources share rows
    with pytest.raises(ValueError, match="seed"):
        build_data(config.data, 1, str(tmp_path)).train.restore(state)


def test_prefetcher_yields_the_same_batches_and_states(two_sources, tmp_path):
    config = _two_source_config(two_sources)
    direct = build_data(config.data, 0, str(tmp_path)).train
    expected = [(next(direct), direct.state()) for _ in range(5)]
    pre = Prefetcher(build_data(config.data, 0, str(tmp_path)).train, depth=2)
    for (xb, xs), (yb, ys) in zip(expected, _take(pre, 5), strict=True):
        assert xs == ys
        np.testing.assert_array_equal(xb["inputs"], yb["inputs"])
    pre.close()


def test_chat_validation_prompts_and_held_out_fraction(two_sources, tmp_path):
    config = _two_source_config(two_sources)
    data = build_data(config.data, 0, str(tmp_path), eval_prompt_limit=8)
    train_chat, val_chat = data.train_sources[0], data.val_sources[0]
    assert (train_chat.name, len(train_chat), len(val_chat)) == ("chat", 48, 12)
    train_where = set(train_chat.table["where"])
    assert not train_where & set(val_chat.table["where"])
    again = build_data(config.data, 0, str(tmp_path))
    assert set(again.val_sources[0].table["where"]) == set(val_chat.table["where"])
    chat_prompts = [p for p in data.eval_prompts if p.source == 0]
    assert chat_prompts and chat_prompts[0].prompt_text.endswith("<|im_start|>assistant\n")
    assert "again" in chat_prompts[0].prompt_text  # the context holds the earlier turns
    assert data.stop_ids == sorted({data.tokenizer.eos_id, data.tokenizer.token_id("<|im_end|>")})


def test_tokenization_is_cached_by_data_tokenizer_template_and_seq_len(two_sources, tmp_path):
    config = _two_source_config(two_sources)
    build_data(config.data, 0, str(tmp_path))
    files = set(glob.glob(str(tmp_path / "cache" / "tokenized-*.arrow")))
    assert len(files) == 4  # two sources x (train, val)
    build_data(config.data, 0, str(tmp_path))
    assert set(glob.glob(str(tmp_path / "cache" / "tokenized-*.arrow"))) == files
    config.data.seq_len = 96
    build_data(config.data, 0, str(tmp_path))
    assert len(set(glob.glob(str(tmp_path / "cache" / "tokenized-*.arrow"))) - files) == 4


def test_each_host_tokenizes_a_disjoint_shard(two_sources, tmp_path):
    config = _two_source_config(two_sources, batch_size=4)
    hosts = [build_data(config.data, 0, str(tmp_path / str(i)), i, 2) for i in range(2)]
    for k in range(2):
        a, b = (set(h.train_sources[k].table["where"]) for h in hosts)
        assert a and b and not a & b
    assert (
        len(set(hosts[0].train_sources[1].table["where"]) | set(hosts[1].train_sources[1].table["where"]))
        == 120
    )
    assert next(hosts[0].train)["inputs"].shape == (2, config.data.seq_len)  # its half of the batch


BAD_LINES = [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('{"prompt": "a"}', "missing field 'response'"),
    ('{"prompt": "a", "response": 7}', "field 'response' must be a string, got int"),
    ('{"prompt": "a", "response": ""}', "field 'response' is empty"),
    (b'{"prompt": "\xff", "response": "b"}', "not valid UTF-8"),
]


def _bad_dir(tmp_path):
    lines = [json.dumps(r).encode() for r in make_records(40, 3)]
    for i, (line, _) in enumerate(BAD_LINES):
        lines.insert(5 * i + 2, line if isinstance(line, bytes) else line.encode())
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 4))
    chat = _chat_records(10, 5)
    chat[3]["messages"] = chat[3]["messages"][:1] + chat[3]["messages"][2:]  # system, then assistant
    write_jsonl(tmp_path / "chat.jsonl", chat)
    return tmp_path


def test_every_bad_record_is_reported_with_file_line_and_reason(tmp_path):
    d = _bad_dir(tmp_path)
    config = tiny_config.get_config(str(d))
    with pytest.raises(DataError) as e:
        build_data(config.data, 0, str(tmp_path / "wd"))
    msg = str(e.value)
    assert f"source 'demo': {len(BAD_LINES)} bad record(s) of 45" in msg
    for i, (_, reason) in enumerate(BAD_LINES):
        assert f"{d / 'train.jsonl'}:{5 * i + 3}: {reason}" in msg, msg
    assert "on_bad_record='skip'" in msg
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_role_order_errors_and_skip_mode_counts(tmp_path):
    from configs.demo import source

    d = _bad_dir(tmp_path)
    config = tiny_config.get_config(str(d))
    config.data.sources.demo = source(str(d / "chat.jsonl"))
    with pytest.raises(DataError, match=r"chat.jsonl:4: role order: the first non-system message"):
        build_data(config.data, 0, str(tmp_path / "wd"))
    config = tiny_config.get_config(str(d))
    config.data.on_bad_record = "skip"
    data = build_data(config.data, 0, str(tmp_path / "wd2"))
    stats = data.train_sources[0].stats
    assert stats["bad"] == len(BAD_LINES) and stats["examples"] == 40
    assert stats["bad_by_reason"] == {
        "invalid_json": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "empty_field": 1,
        "not_utf8": 1,
    }


def test_overlong_policies_are_applied_and_counted(tmp_path):
    records = make_records(30, 6) + [
        {"prompt": "upper: " + " ".join("ab" * 40), "response": "A B"},
        {"prompt": "upper: a", "response": " ".join("CD" * 40)},
    ]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 7))
    config = tiny_config.get_config(str(tmp_path))
    stats = {}
    for policy in ("truncate", "truncate_prompt", "drop"):
        config.data.overlong = policy
        src = build_data(config.data, 0, str(tmp_path / policy)).train_sources[0]
        stats[policy] = (src.stats["truncated"], src.stats["dropped_overlong"], len(src))
        lengths = [len(src.example(i).ids) for i in range(len(src))]
        assert max(lengths) <= config.data.seq_len + 1
    # truncate: the long prompt leaves nothing to train (dropped); the long response is cut.
    assert stats == {"truncate": (1, 1, 31), "truncate_prompt": (2, 0, 32), "drop": (0, 2, 30)}


def test_multi_process_tokenization_gives_the_same_examples(two_sources, tmp_path):
    config = _two_source_config(two_sources)
    one = build_data(config.data, 0, str(tmp_path / "one"))
    config.data.num_proc = 2
    two = build_data(config.data, 0, str(tmp_path / "two"))
    for a, b in zip(one.train_sources, two.train_sources, strict=True):
        assert len(a) == len(b)
        for i in range(len(a)):
            np.testing.assert_array_equal(a.example(i).ids, b.example(i).ids)
            np.testing.assert_array_equal(a.example(i).mask, b.example(i).mask)


def test_global_batches_depend_on_num_shards_not_on_the_process_count(two_sources, tmp_path):
    config = _two_source_config(two_sources, num_shards=2)
    single = build_data(config.data, 0, str(tmp_path / "single"))
    hosts = [build_data(config.data, 0, str(tmp_path / f"host{i}"), i, 2) for i in range(2)]
    for _ in range(6):
        whole = next(single.train)
        parts = [next(h.train) for h in hosts]
        for k in packing.ROW_KEYS:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    # A checkpoint holds every shard: the merged host states equal the single process's state.
    assert merge_states([h.train.state() for h in hosts]) == single.train.state()
