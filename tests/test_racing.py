"""The statistics of racing (`ddo_patch.racing`): FID and its paired grouped jackknife, and which snapshots stop."""

import numpy as np
import pytest

from ddo_patch import racing
from ddo_patch.errors import DDOPatchError
from ddo_patch.metrics import feature_statistics, frechet_distance


def test_frechet_to_reference_is_fid_and_its_jackknife_error_shrinks_as_one_over_root_n():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 6))
    mu, sigma = feature_statistics(reference)
    errors = {}
    for n in (200, 800):
        features = rng.normal(0.3, 1.2, size=(n, 6))
        groups = racing.jackknife_groups(n, 10)
        score, leave_out = racing.frechet_to_reference(features, mu, sigma, groups)
        assert score == pytest.approx(frechet_distance(*feature_statistics(features), mu, sigma), rel=1e-9)
        assert leave_out[3] == pytest.approx(frechet_distance(*feature_statistics(np.delete(features, groups[3], 0)), mu, sigma))
        errors[n] = np.sqrt(9 / 10 * np.square(leave_out - leave_out.mean()).sum())
    assert 1.4 < errors[200] / errors[800] < 2.8   # sqrt(4) = 2
    with pytest.raises(DDOPatchError, match='features of shape \\(5, 3\\) do not match reference statistics of dimension 6'):
        racing.frechet_to_reference(np.zeros((5, 3)), mu, sigma, racing.jackknife_groups(5, 2))


def test_the_groups_are_one_partition_per_level_the_same_in_every_job():
    groups = racing.jackknife_groups(50, 10)
    assert sorted(np.concatenate(groups).tolist()) == list(range(50)) and [len(g) for g in groups] == [5] * 10
    assert all(np.array_equal(a, b) for a, b in zip(groups, racing.jackknife_groups(50, 10)))
    assert len({i % 10 for i in groups[0]}) > 1          # seeds are class-balanced in order: a group mixes classes
    with pytest.raises(DDOPatchError, match='a race level of 4 samples cannot be split into 5 jackknife groups'):
        racing.jackknife_groups(4, 5)


def test_beat_probability_is_the_normal_tail_of_the_difference_over_its_paired_jackknife_error():
    shared = np.array([1.0, -1.0, 0.5, -0.5])               # errors the two share (the same seeds): they cancel
    leader = 2.0 + shared
    other = 2.3 + shared + np.array([0.1, -0.1, 0.1, -0.1])
    se = np.sqrt(3 / 4 * 4 * 0.1 ** 2)                       # the jackknife error of the difference alone
    assert racing.beat_probability(2.3, other, 2.0, leader) == pytest.approx(0.5 * __import__('math').erfc(0.3 / se / np.sqrt(2)))
    assert racing.beat_probability(2.0, leader, 2.0, leader) == 0.5
    assert racing.beat_probability(2.5, [2.5] * 4, 2.0, [2.0] * 4) == 0.0   # no spread: the difference decides


def _race(scores, error, groups=10):
    """Scores and leave-one-group-out scores with independent errors whose jackknife standard error is `error`."""
    rng = np.random.default_rng(1)
    leave_out = {}
    for name, score in scores.items():
        noise = rng.normal(size=groups)
        leave_out[name] = list(score + noise * error / np.sqrt((groups - 1) / groups * np.square(noise - noise.mean()).sum()))
    return scores, leave_out   # lists, as a race level's JSON gives them


def test_a_clear_loser_stops_and_a_close_one_races_on():
    scores, leave_out = _race({'a': 1.0, 'b': 1.05, 'c': 2.0}, 0.1)
    stopped = racing.stops(scores, leave_out, {'a': 'p1', 'b': 'p2', 'c': 'p3'}, {'a', 'b', 'c'}, 1, 0.05)
    assert list(stopped) == ['c'] and stopped['c'] == 'P(beats a) = 0.000 < 0.05'


def test_min_points_keeps_the_least_bad_points_in_the_race():
    scores, leave_out = _race({'a': 1.0, 'b': 2.0, 'c': 3.0, 'd': 4.0}, 0.1)
    points = {'a': 'p1', 'b': 'p2', 'c': 'p3', 'd': 'p4'}
    # d stops first (the worst), then c; b would leave one point, fewer than the two halving keeps
    assert sorted(racing.stops(scores, leave_out, points, set(points), 2, 0.05)) == ['c', 'd']
    # two snapshots of one point: the point stays in the race through the other one
    assert sorted(racing.stops(scores, leave_out, dict(points, d='p2'), set(points), 2, 0.05)) == ['c', 'd']
    # competitors of points no longer trained (None) beat others but do not count as points
    assert sorted(racing.stops(scores, leave_out, dict(points, a=None), {'b', 'c', 'd'}, 2, 0.05)) == ['d']


def test_only_racing_snapshots_stop_and_a_bad_threshold_is_refused():
    scores, leave_out = _race({'a': 1.0, 'b': 3.0}, 0.1)
    assert racing.stops(scores, leave_out, {'a': 'p1', 'b': 'p2'}, {'a'}, 1, 0.05) == {}   # b is final already
    with pytest.raises(DDOPatchError, match='race threshold must lie in \\(0, 1\\), got 1'):
        racing.stops(scores, leave_out, {'a': 'p1', 'b': 'p2'}, {'b'}, 1, 1)
