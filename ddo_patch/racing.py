"""Racing: a round's snapshots scored on a few samples first, only those that could still be the best scored on more.

Every evaluated snapshot of a round competes to be its choice, but most are clearly worse after a few thousand
samples. With `[evaluate] policy = "racing"` the round manager scores them at increasing sample counts, the
`race_samples` levels and then the full seed list, always on the first n seeds of the selection seeds (so each
level extends the last one and every competitor at a level is scored on the same seeds). After each level a
snapshot stops when the probability that it beats the level's leader is below `race_threshold`; the survivors
of the last level are scored on every seed, and only full-count scores choose (FID depends on the count).

The uncertainty is the evaluator's own: a paired bootstrap over the level's seeds. B index sets resample the n
seeds with replacement, the same sets for every competitor (their samples share seeds, so their errors are
correlated and the difference is what matters); P(s beats the leader) is the share of resamples in which s
scores lower than the leader (ties count half). benchmarks/racing.py checks the bootstrap's spread against
the spread over disjoint seed sets.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ddo_patch.errors import DDOPatchError

DEFAULT_THRESHOLD = 0.05
DEFAULT_BOOTSTRAP = 200


def resample_indices(n: int, count: int) -> np.ndarray:
    """[count, n] seed indices drawn with replacement, fixed by n: every job that races at n samples draws the same."""
    return np.random.default_rng(n).integers(0, n, size=(count, n))


def frechet_to_reference(features: np.ndarray, mu_ref, sigma_ref, indices: np.ndarray) -> tuple:
    """(Frechet distance of the features [n, D] to the reference statistics, that distance over each resample of
    `indices` [B, n]). Tr (S R)^(1/2) is taken as the sum of the square roots of the eigenvalues of R^(1/2) S R^(1/2),
    with R^(1/2) computed once: one symmetric eigendecomposition per resample."""
    features = np.asarray(features, dtype=np.float64)
    mu_ref, sigma_ref = np.asarray(mu_ref, dtype=np.float64), np.asarray(sigma_ref, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != mu_ref.shape[0]:
        raise DDOPatchError(f'features of shape {features.shape} do not match reference statistics of dimension '
                            f'{mu_ref.shape[0]}; compute both with the same detector')
    root = np.real(scipy.linalg.sqrtm(sigma_ref))
    root = (root + root.T) / 2
    trace_ref = np.trace(sigma_ref)

    def distance(x):
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        eigenvalues = np.linalg.eigvalsh(root @ sigma @ root)
        return float(np.square(mu - mu_ref).sum() + np.trace(sigma) + trace_ref - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())

    return distance(features), np.array([distance(features[i]) for i in indices])


def stops(scores: dict, bootstrap: dict, point_of: dict, racing: set, min_points: int, threshold: float) -> dict:
    """Which of the `racing` snapshots stop at this level: {snapshot: why}.

    `scores` {snapshot: score at this level}, `bootstrap` {snapshot: scores over the shared resamples}, for every
    competitor (those already scored in full compete too, to be beaten); `point_of` {snapshot: its sweep point}.
    A racing snapshot stops when P(it beats the leader) < threshold, the least likely first, except where that
    would leave fewer than `min_points` sweep points with a snapshot still in the race or already final (successive
    halving keeps that many points at a rung); snapshots whose `point_of` is None (points no longer trained, which
    still compete for the round's choice) do not count as points."""
    if not 0 < threshold < 1:
        raise DDOPatchError(f'race threshold must lie in (0, 1), got {threshold}')
    leader = min(sorted(scores), key=lambda name: scores[name])
    ahead = {name: float(np.mean(bootstrap[name] < bootstrap[leader]) + 0.5 * np.mean(bootstrap[name] == bootstrap[leader]))
             for name in racing if name != leader}
    alive = {name: point_of[name] for name in scores if point_of[name] is not None}
    stopped = {}
    for name in sorted((n for n in ahead if ahead[n] < threshold), key=lambda n: (ahead[n], -scores[n], n)):
        points_after = len({point for s, point in alive.items() if s != name})
        if points_after < len(set(alive.values())) and points_after < min_points:
            continue
        alive.pop(name, None)
        stopped[name] = f'P(beats {leader}) = {ahead[name]:.3f} < {threshold:g}'
    return stopped
