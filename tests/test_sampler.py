import numpy as np
import pytest
from scipy import stats

from mixtune.data.sampler import MixtureSampler, SamplerExhausted, shard
from mixtune.errors import MixtuneError

NAMES = ["a", "b", "c"]


def test_frequencies_match_weights_chi_square():
    w = np.array([0.6, 0.3, 0.1])
    s = MixtureSampler([50, 70, 30], NAMES, w, seed=3)
    ds = np.concatenate([s.next_batch(64)[0] for _ in range(300)])
    observed = np.bincount(ds, minlength=3)
    p = stats.chisquare(observed, w * observed.sum()).pvalue
    assert p > 1e-3, observed
    # and a clearly different distribution is rejected by the same test
    assert stats.chisquare(observed, np.array([1 / 3] * 3) * observed.sum()).pvalue < 1e-6


def test_without_replacement_within_a_pass_and_reshuffled_next():
    s = MixtureSampler([10, 10], ["a", "b"], [1.0, 0.0], seed=0)
    first = np.concatenate([s.next_batch(5)[1] for _ in range(2)])
    second = np.concatenate([s.next_batch(5)[1] for _ in range(2)])
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)


def test_deterministic_and_state_round_trip():
    def stream(s, n):
        return [tuple(map(tuple, s.next_batch(7))) for _ in range(n)]

    a = MixtureSampler([13, 8, 21], NAMES, [0.2, 0.5, 0.3], seed=9)
    b = MixtureSampler([13, 8, 21], NAMES, [0.2, 0.5, 0.3], seed=9)
    assert stream(a, 5) == stream(b, 5)
    a.set_weights([0.7, 0.1, 0.2])
    state = a.state_dict()
    rest = stream(a, 9)
    c = MixtureSampler([13, 8, 21], NAMES, [1 / 3] * 3, seed=0)
    c.load_state_dict(state)
    assert stream(c, 9) == rest
    other = MixtureSampler([13, 8, 21], NAMES, [0.2, 0.5, 0.3], seed=10)
    assert stream(other, 5) != stream(MixtureSampler([13, 8, 21], NAMES, [0.2, 0.5, 0.3], 9), 5)


def test_weights_change_takes_effect_at_once():
    s = MixtureSampler([40, 40], ["a", "b"], [1.0, 0.0], seed=1)
    assert set(s.next_batch(16)[0]) == {0}
    s.set_weights({"b": 1.0})
    assert set(s.next_batch(16)[0]) == {1}


def test_non_repeating_dataset_is_exhausted_then_skipped():
    s = MixtureSampler([5, 100], ["small", "big"], [0.9, 0.1], seed=0, repeat=[False, True])
    drawn = np.concatenate([s.next_batch(10)[0] for _ in range(5)])
    assert (drawn == 0).sum() == 5
    assert s.exhausted[0]
    s2 = MixtureSampler([4], ["only"], [1.0], seed=0, repeat=[False])
    s2.next_batch(4)
    with pytest.raises(SamplerExhausted, match="repeat: true"):
        s2.next_batch(1)


def test_invalid_weights_are_rejected_in_one_place():
    s = MixtureSampler([5, 5], ["a", "b"], [0.5, 0.5])
    for bad in ([0.5, np.nan], [-0.1, 1.1], [0.2, 0.2], {"zz": 1.0}):
        with pytest.raises(MixtuneError):
            s.set_weights(bad)


def test_shards_are_disjoint_and_cover_the_batch():
    n, world, micro = 16, 2, 4
    seen = []
    for rank in range(world):
        for sl in shard(n, world, rank, micro):
            seen.extend(range(n)[sl])
    assert sorted(seen) == list(range(n))


def test_draw_from_does_not_touch_state():
    s = MixtureSampler([30, 30], ["a", "b"], [0.5, 0.5], seed=2)
    before = s.state_dict()
    x = s.draw_from(1, 8, key=3)
    assert s.state_dict() == before
    assert list(x) == list(s.draw_from(1, 8, key=3)) and len(set(x)) == 8


def test_guide_table_lookup_equals_binary_search():
    K = 1024
    w = np.random.default_rng(0).dirichlet(np.full(K, 0.05))
    s = MixtureSampler([10] * K, [str(i) for i in range(K)], w, seed=0)
    u = np.concatenate(
        [np.random.default_rng(1).random(5000), s._cdf[:-1], np.nextafter(s._cdf[:-1], 0)]
    )
    u = u[(u >= 0) & (u < 1)]
    want = np.minimum(np.searchsorted(s._cdf, u, side="right"), K - 1)
    assert np.array_equal(s._lookup(u), want)
