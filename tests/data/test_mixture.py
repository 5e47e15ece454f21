import numpy as np
import pytest

from jsft.data.mixture import MixtureSampler, mixture_probabilities


def test_probability_rules():
    np.testing.assert_allclose(mixture_probabilities([10, 1000], [3, 1], "weights"), [0.75, 0.25])
    np.testing.assert_allclose(
        mixture_probabilities([100, 1000, 10_000], [1, 1, 1], "examples", cap=1000),
        [100 / 2100, 1000 / 2100, 1000 / 2100],
    )
    np.testing.assert_allclose(
        mixture_probabilities([100, 400], [1, 1], "temperature", temperature=2.0), [10 / 30, 20 / 30]
    )
    np.testing.assert_allclose(mixture_probabilities([100, 400], [1, 1], "temperature"), [0.2, 0.8])
    with pytest.raises(ValueError, match="config.data.mixture"):
        mixture_probabilities([1], [1], "uniformly")
    with pytest.raises(ValueError, match="positive sum"):
        mixture_probabilities([1, 2], [0, 0], "weights")


def test_draws_follow_the_probabilities_within_statistical_tolerance():
    probs = np.array([0.5, 0.3, 0.2])
    sampler = MixtureSampler([50, 7, 1000], probs, seed=0)
    n = 30_000
    counts = np.bincount([sampler.next()[0] for _ in range(n)], minlength=3)
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) < 4 * sigma), counts


def test_each_source_is_walked_once_per_epoch_and_epochs_are_counted():
    sampler = MixtureSampler([5, 3], np.array([0.5, 0.5]), seed=1)
    seen = {0: [], 1: []}
    while sampler.positions[1][0] < 4:  # four epochs of the small source
        s, i = sampler.next()
        seen[s].append(i)
    for epoch in range(4):
        assert sorted(seen[1][3 * epoch : 3 * epoch + 3]) == [0, 1, 2]
    assert seen[1][:3] != seen[1][3:6] or seen[1][3:6] != seen[1][6:9]  # reshuffled per epoch


def test_same_seed_same_draws_and_restore_continues_exactly():
    a, b = (
        MixtureSampler([10, 20], np.array([0.4, 0.6]), 7),
        MixtureSampler([10, 20], np.array([0.4, 0.6]), 7),
    )
    assert [a.next() for _ in range(5000)] == [b.next() for _ in range(5000)]
    state = a.state()
    expected = [a.next() for _ in range(100)]
    c = MixtureSampler([10, 20], np.array([0.4, 0.6]), 7)
    c.restore(state)
    assert [c.next() for _ in range(100)] == expected
    other = MixtureSampler([10, 20], np.array([0.4, 0.6]), 8)
    assert [other.next() for _ in range(50)] != expected[:50]
