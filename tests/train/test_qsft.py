"""Q-SFT: Bellman targets on a hand-computed multi-turn case, the weighted cross-entropy by
definition, rewards placed on each assistant turn's last token, bad rewards as bad records naming
file:line, and a Q-SFT run whose target and behaviour copies resume bitwise."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.demo import source
from jsft.data.pipeline import build_data
from jsft.data.sources import DataError
from jsft.data.tokenizing import place_rewards
from jsft.train import qsft
from tests import tiny_config
from tests.conftest import make_records, write_jsonl


def test_bellman_targets_on_a_hand_computed_two_turn_example():
    # One row: example 1 at positions 0-6 with assistant turns at 1-2 and 5-6; example 2 at 7-9.
    mask = jnp.array([[0, 1, 1, 0, 0, 1, 1, 0, 1, 1]])
    seg = jnp.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2]])
    reward = jnp.array([[0, 0, 0.2, 0, 0, 0, 1.0, 0, 0, 0.5]])
    ratio = 0.1 * jnp.arange(10.0)[None]  # max_a p_target / pi_beta at each position's state
    b = np.asarray(qsft.bellman_targets(ratio, reward, mask, seg, gamma=0.9))[0]
    expected = {
        1: 0.0 + 1.0 * 0.2,  # inside turn 1: no discount, bootstrap from position 2
        2: 0.2 + 0.9 * 0.5,  # end of turn 1: its reward + gamma * the value where turn 2 starts
        5: 0.0 + 1.0 * 0.6,
        6: 1.0,  # the example's last trained token: terminal, the reward alone
        8: 0.0 + 1.0 * 0.9,  # example 2 never bootstraps from example 1 (packing)
        9: 0.5,
    }
    for t, value in expected.items():
        assert b[t] == pytest.approx(value, abs=1e-6), (t, b[t], value)
    clipped = np.asarray(qsft.bellman_targets(ratio * 10, reward, mask, seg, gamma=0.9))[0]
    assert clipped.max() <= 1.0 and clipped[1] == 1.0  # 0 + 2.0 is clipped into [0, 1]


def test_the_weighted_cross_entropy_by_definition():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    y = jnp.array([[1, 2, 3], [4, 5, 6]])
    b = jnp.array([[0.1, 0.5, 1.0], [0.0, 0.3, 0.9]])
    log_p = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_p, y[..., None], -1)[..., 0]
    smooth = -jnp.mean(log_p, -1)
    others = jnp.sum(log_p, -1) + nll  # sum over a != y of log p_a
    expect = -(b * -nll + (1 - b) / 6 * others)
    np.testing.assert_allclose(qsft.weighted_ce(nll, smooth, b, 7), expect, rtol=1e-5)


def test_rewards_sit_on_the_last_token_of_each_trained_turn():
    mask = [False, True, True, False, False, True, True, True]
    assert place_rewards(mask, [0.25, 1.0], "all_assistant") == [0, 0, 0.25, 0, 0, 0, 0, 1.0]
    assert place_rewards([False, False, True, True], [0.25, 1.0], "last_assistant") == [0, 0, 0, 1.0]


def _config(tmp_path, records):
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 9))
    config = tiny_config.get_config(str(tmp_path))
    config.data.sources.demo = source(str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"))
    config.data.rewards = True
    return config


def _chat(reward_turn="assistant", reward=1.0):
    return {
        "messages": [
            {"role": "user", "content": "a b"},
            {"role": "assistant", "content": "A B", "reward": 0.0},
            {"role": "user", "content": "c", **({"reward": reward} if reward_turn == "user" else {})},
            {
                "role": "assistant",
                "content": "C",
                **({"reward": reward} if reward_turn == "assistant" else {}),
            },
        ]
    }


def test_bad_rewards_are_bad_records_naming_the_line(tmp_path):
    records = [dict(r, reward=1.0) for r in make_records(20, 3)]
    records[2] = {k: v for k, v in records[2].items() if k != "reward"}
    records[4]["reward"] = "high"
    records[6]["reward"] = 1.5
    config = _config(tmp_path, records)
    with pytest.raises(DataError) as e:
        build_data(config.data, 0, str(tmp_path / "wd"))
    msg = str(e.value)
    train = tmp_path / "train.jsonl"
    assert f"{train}:3: missing field 'reward'" in msg
    assert f"{train}:5: field 'reward' must be a number in [0, 1], got 'high'" in msg
    assert f"{train}:7: field 'reward'=1.5 is outside [0, 1]" in msg
    chats = [_chat() for _ in range(10)] + [_chat("user")]
    write_jsonl(train, chats)
    write_jsonl(tmp_path / "val.jsonl", [_chat() for _ in range(3)])
    with pytest.raises(DataError) as e:
        build_data(config.data, 0, str(tmp_path / "wd2"))
    assert f"{train}:11: message 2 (user) has a reward; rewards go on assistant turns" in str(e.value)


def test_chat_rewards_reach_the_packed_rows_at_each_turns_end(tmp_path):
    config = _config(tmp_path, [_chat(reward=0.75) for _ in range(12)])
    write_jsonl(tmp_path / "val.jsonl", [_chat() for _ in range(3)])
    config.data.template, config.data.seq_len = "chatml", 64
    data = build_data(config.data, 0, str(tmp_path / "wd"))
    ex = data.train_sources[0].example(0)
    ends = [i for i in range(len(ex.mask)) if ex.mask[i] and (i + 1 == len(ex.mask) or not ex.mask[i + 1])]
    assert len(ends) == 2 and ex.reward[ends[0]] == 0.0 and ex.reward[ends[1]] == 0.75
    assert np.count_nonzero(ex.reward) == 1
    batch = next(iter(data.train))
    assert batch["reward"].dtype == np.float32 and np.isclose(batch["reward"].max(), 0.75)


@pytest.mark.slow
def test_a_qsft_run_trains_and_resumes_bitwise_with_its_target_and_behaviour_copies(tmp_path):
    records = []
    for i, r in enumerate(make_records(200, 4)):
        wrong = i % 3 == 0  # a third of the replies are wrong and carry reward 0
        response = r["response"].lower() if wrong else r["response"]
        records.append(dict(r, response=response, reward=0.0 if wrong else 1.0))
    config = _config(tmp_path, records)
    config.loss.objective, config.loss.qsft_gamma, config.loss.qsft_polyak = "qsft", 0.95, 0.05
    config.train.steps, config.train.checkpoint_every_steps, config.train.eval_every_steps = 8, 4, 4
    from jsft.modes.train import train_and_evaluate  # noqa: PLC0415
    from jsft.run import Run  # noqa: PLC0415
    from tests.train.test_loop import _losses  # noqa: PLC0415

    train_and_evaluate(config, str(tmp_path / "full"))
    config.train.stop_after_steps = 4
    train_and_evaluate(config, str(tmp_path / "resumed"))
    config.train.stop_after_steps = 0
    train_and_evaluate(config, str(tmp_path / "resumed"))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss/qsft" in r]
    assert logged and all(0.0 <= r["train/loss/qsft_target"] <= 1.0 for r in logged)
    # The checkpoint holds the target and behaviour copies: the behaviour copy is the start.
    run = Run.create(config, str(tmp_path / "full"))
    meta = run.checkpointer().read_meta(8)
    assert any(k.startswith(".aux['behavior']") for k in meta["checksums"])
    assert any(k.startswith(".aux['target']") for k in meta["checksums"])


def test_qsft_steps_are_the_same_packed_unpacked_and_accumulated():
    import optax  # noqa: PLC0415

    from jsft.data import packing  # noqa: PLC0415
    from jsft.models.llama import LlamaConfig  # noqa: PLC0415
    from jsft.models.registry import ModelDef  # noqa: PLC0415
    from jsft.train.objectives import Objective  # noqa: PLC0415
    from jsft.train.state import TrainState  # noqa: PLC0415
    from jsft.train.step import make_train_step  # noqa: PLC0415
    from tests.train.test_step import VOCAB, _examples, _padded  # noqa: PLC0415

    jax.config.update("jax_default_matmul_precision", "float32")
    model = ModelDef.create(LlamaConfig.tiny(vocab_size=VOCAB))
    rng = np.random.default_rng(0)
    examples = []
    for ex in _examples(8, seed=3):  # a reward on the last trained token of each example
        reward = np.zeros(len(ex.ids), np.float32)
        reward[np.flatnonzero(ex.mask)[-1]] = rng.choice([0.0, 1.0])
        examples.append(packing.Example(ex.ids, ex.mask, 0, 1.0, reward))
    objective = Objective("qsft", qsft_gamma=0.9, qsft_polyak=0.1)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    params = model.init(jax.random.key(0))
    # A target copy that differs from the parameters, so the backups are not all 1.
    target = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), params)

    def run(batch, accum):
        state = TrainState.create(params, tx, jax.random.key(1), copies=objective.state_copies)
        state = state.replace(aux=dict(state.aux, target=target))
        step = jax.jit(make_train_step(model, tx, schedule, accum, objective=objective))
        return step(state, batch)

    packed, padded = packing.pack(examples, 32), _padded(examples, 16)
    (s1, m1), (s2, m2), (s4, m4) = run(packed, 1), run(padded, 1), run(padded, 4)
    for m in (m2, m4):
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["loss/qsft_target"], m1["loss/qsft_target"], rtol=1e-5)
    assert 0.0 < float(m1["loss/qsft_target"]) < 1.0
    for s in (s2, s4):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s.params)
    # The target moved toward the new parameters by the Polyak rate.
    expect = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, target, s4.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s4.aux["target"], expect
    )
