"""Metric math against closed forms."""

import numpy as np
import pytest

from ddo_patch.errors import DDOPatchError
from ddo_patch.metrics import class_consistency, coverage, feature_statistics, frechet_distance, precision_recall
from ddo_patch.seeds import balanced_labels


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 for commuting covariances
    expected = 9 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    with pytest.raises(DDOPatchError, match='same detector'):
        frechet_distance(mu1, s1, np.zeros(3), np.eye(3))


def test_feature_statistics_and_frechet_on_samples():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 2))
    b = rng.standard_normal((20000, 2)) * 2 + 1
    fd = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fd == pytest.approx(2 + 2 * (2 - 1) ** 2, rel=0.05)
    with pytest.raises(DDOPatchError):
        feature_statistics(np.zeros(5))


def test_coverage_full_for_same_distribution_and_partial_for_a_missing_mode():
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.normal(-3, 0.3, (2000, 2)), rng.normal(3, 0.3, (2000, 2))])
    same = np.concatenate([rng.normal(-3, 0.3, (2000, 2)), rng.normal(3, 0.3, (2000, 2))])
    one_mode = rng.normal(3, 0.3, (4000, 2))
    assert coverage(real, same) > 0.95
    assert 0.45 < coverage(real, one_mode) < 0.52


def test_balanced_labels_exact_for_any_multiple_of_the_classes():
    labels = balanced_labels(range(17, 17 + 5 * 7), 7)
    assert np.bincount(labels, minlength=7).tolist() == [5] * 7
    # A seed's class depends on the seed alone (shardable, resumable).
    assert balanced_labels([40], 7)[0] == balanced_labels(range(0, 50), 7)[40]
    with pytest.raises(DDOPatchError):
        balanced_labels([0], 0)


def test_precision_recall_of_kynkaanniemi_on_modes_and_outliers():
    """(0.1 s) A set against itself is inside its own manifold; a fake set on one of two real modes has full
    precision and half the recall; fakes far from the data lower precision by exactly their share."""
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(-5, 0.5, (1000, 3)), rng.normal(5, 0.5, (1000, 3))])
    assert precision_recall(real, real) == (1.0, 1.0)
    precision, recall = precision_recall(real, rng.normal(5, 0.5, (2000, 3)))
    assert precision > 0.94 and 0.45 < recall <= 0.5   # the other mode is not covered at all
    far = np.concatenate([real[:1600], rng.normal(50, 0.5, (400, 3))])   # 20% of the fakes off the data
    precision, recall = precision_recall(real, far)
    assert 0.79 < precision <= 0.8 and recall > 0.97
    with pytest.raises(DDOPatchError, match='same D'):
        precision_recall(real, real[:, :2])
    with pytest.raises(DDOPatchError, match='more than k'):
        precision_recall(real[:3], real)


def test_class_consistency_counts_matching_labels():
    assert class_consistency([1, 2, 3, 0], [1, 2, 0, 0]) == 0.75
    with pytest.raises(DDOPatchError, match='one prediction per label'):
        class_consistency([1, 2], [1, 2, 3])
