"""The statistics of racing (`ddo_patch.racing`): FID and its paired bootstrap, and which snapshots stop."""

import numpy as np
import pytest

from ddo_patch import racing
from ddo_patch.errors import DDOPatchError
from ddo_patch.metrics import feature_statistics, frechet_distance


def test_frechet_to_reference_is_fid_and_its_bootstrap_shrinks_as_one_over_root_n():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 6))
    mu, sigma = feature_statistics(reference)
    spreads = {}
    for n in (200, 800):
        features = rng.normal(0.3, 1.2, size=(n, 6))
        score, bootstrap = racing.frechet_to_reference(features, mu, sigma, racing.resample_indices(n, 300))
        assert score == pytest.approx(frechet_distance(*feature_statistics(features), mu, sigma), rel=1e-9)
        assert bootstrap.shape == (300,)
        spreads[n] = bootstrap.std()
    assert 1.5 < spreads[200] / spreads[800] < 2.7   # sqrt(4) = 2
    with pytest.raises(DDOPatchError, match='features of shape \\(5, 3\\) do not match reference statistics of dimension 6'):
        racing.frechet_to_reference(np.zeros((5, 3)), mu, sigma, racing.resample_indices(5, 10))


def test_resamples_are_the_same_for_every_competitor_at_a_level():
    assert np.array_equal(racing.resample_indices(50, 20), racing.resample_indices(50, 20))
    assert not np.array_equal(racing.resample_indices(50, 20), racing.resample_indices(51, 20)[:, :50])


def _race(scores, spread, size=400):
    rng = np.random.default_rng(1)
    return scores, {name: score + spread * rng.normal(size=size) for name, score in scores.items()}


def test_a_clear_loser_stops_and_a_close_one_races_on():
    scores, bootstrap = _race({'a': 1.0, 'b': 1.05, 'c': 2.0}, 0.1)
    stopped = racing.stops(scores, bootstrap, {'a': 'p1', 'b': 'p2', 'c': 'p3'}, {'a', 'b', 'c'}, 1, 0.05)
    assert list(stopped) == ['c'] and stopped['c'] == 'P(beats a) = 0.000 < 0.05'


def test_min_points_keeps_the_least_bad_points_in_the_race():
    scores, bootstrap = _race({'a': 1.0, 'b': 2.0, 'c': 3.0, 'd': 4.0}, 0.1)
    points = {'a': 'p1', 'b': 'p2', 'c': 'p3', 'd': 'p4'}
    # d stops first (least likely), then c; b would leave one point, fewer than the two halving keeps
    assert sorted(racing.stops(scores, bootstrap, points, set(points), 2, 0.05)) == ['c', 'd']
    # two snapshots of one point: the point stays in the race through the other one
    assert sorted(racing.stops(scores, bootstrap, dict(points, d='p2'), set(points), 2, 0.05)) == ['c', 'd']
    # competitors of points no longer trained (None) beat others but do not count as points
    assert sorted(racing.stops(scores, bootstrap, dict(points, a=None), {'b', 'c', 'd'}, 2, 0.05)) == ['d']


def test_only_racing_snapshots_stop_and_a_bad_threshold_is_refused():
    scores, bootstrap = _race({'a': 1.0, 'b': 3.0}, 0.1)
    assert racing.stops(scores, bootstrap, {'a': 'p1', 'b': 'p2'}, {'a'}, 1, 0.05) == {}   # b is final already
    with pytest.raises(DDOPatchError, match='race threshold must lie in \\(0, 1\\), got 1'):
        racing.stops(scores, bootstrap, {'a': 'p1', 'b': 'p2'}, {'b'}, 1, 1)
