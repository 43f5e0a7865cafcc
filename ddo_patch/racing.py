"""Racing: a round's snapshots scored on a few samples first, only those that could still be the best scored on more.

Every evaluated snapshot of a round competes to be its choice, but most are clearly worse after a few thousand
samples. With `[evaluate] policy = "racing"` the round manager scores them at increasing sample counts, the
`race_samples` levels and then the full seed list, always on the first n seeds of the selection seeds (so each
level extends the last one and every competitor at a level is scored on the same seeds). After each level a
snapshot stops when the probability that it beats the level's leader is below `race_threshold`; the survivors
of the last level are scored on every seed, and only full-count scores choose (FID depends on the count).

The uncertainty is the evaluator's own: a paired grouped jackknife. The level's n seeds fall into G groups
(a fixed random partition, the same for every competitor: their samples share seeds, so their errors are
correlated and the difference is what matters); each competitor is also scored without each group, and the
standard error of the difference d of two competitors is sqrt((G - 1) / G * sum_g (d_g - mean d_g)^2).
P(s beats the leader) = Phi(-d / se). Measured on the digits benchmark (benchmarks/sweep_policies.py,
docs/rounds.md) against the spread of d over 10 disjoint seed sets at 50, 150 and 500 samples, the jackknife's
standard error is 1.1-2.5x of it, conservative, as a bootstrap's (1.1-2.3x); the jackknife costs G Frechet
distances per snapshot and level instead of a bootstrap's hundreds.
"""

from __future__ import annotations

import math

from ddo_patch.errors import DDOPatchError

# numpy and scipy are imported where they are used: the round manager imports this module, and a manager restarted
# after a crash must start fast enough to stop the job it left running before that job ends on its own.

DEFAULT_THRESHOLD = 0.05
DEFAULT_GROUPS = 10


def jackknife_groups(n: int, groups: int) -> list:
    """The level's n seed positions in `groups` groups: a random partition fixed by n, so every job that races at n
    samples uses the same one (seeds are class-balanced in order; a random partition keeps each group mixed)."""
    import numpy as np
    if not 2 <= groups <= n:
        raise DDOPatchError(f'a race level of {n} samples cannot be split into {groups} jackknife groups (2 to {n})')
    return np.array_split(np.random.default_rng(n).permutation(n), groups)


def frechet_to_reference(features: np.ndarray, mu_ref, sigma_ref, groups: list) -> tuple:
    """(Frechet distance of the features [n, D] to the reference statistics, that distance without each group of
    `groups`). Tr (S R)^(1/2) is taken as the sum of the square roots of the eigenvalues of R^(1/2) S R^(1/2), with
    R^(1/2) computed once: one symmetric eigendecomposition per group."""
    import numpy as np
    import scipy.linalg
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

    return distance(features), np.array([distance(np.delete(features, group, axis=0)) for group in groups])


def beat_probability(score, leave_out, leader_score, leader_leave_out) -> float:
    """P(a competitor beats the leader): Phi(-d / se), d the difference of their scores, se the paired grouped
    jackknife's standard error of d (both scored without the same groups)."""
    import numpy as np
    d_groups = np.asarray(leave_out, dtype=float) - np.asarray(leader_leave_out, dtype=float)
    se = math.sqrt((len(d_groups) - 1) / len(d_groups) * float(np.square(d_groups - d_groups.mean()).sum()))
    d = score - leader_score
    if se == 0:
        return 0.5 if d == 0 else float(d < 0)
    return 0.5 * math.erfc(d / se / math.sqrt(2))


def stops(scores: dict, leave_out: dict, point_of: dict, racing: set, min_points: int, threshold: float) -> dict:
    """Which of the `racing` snapshots stop at this level: {snapshot: why}.

    `scores` {snapshot: score at this level}, `leave_out` {snapshot: its scores without each jackknife group}, for every
    competitor (those already scored in full compete too, to be beaten); `point_of` {snapshot: its sweep point}.
    A racing snapshot stops when P(it beats the leader) < threshold, the worst-scoring first, except where that
    would leave fewer than `min_points` sweep points with a snapshot still in the race or already final (successive
    halving keeps that many points at a rung); snapshots whose `point_of` is None (points no longer trained, which
    still compete for the round's choice) do not count as points."""
    if not 0 < threshold < 1:
        raise DDOPatchError(f'race threshold must lie in (0, 1), got {threshold}')
    leader = min(sorted(scores), key=lambda name: scores[name])
    ahead = {name: beat_probability(scores[name], leave_out[name], scores[leader], leave_out[leader])
             for name in racing if name != leader}
    alive = {name: point_of[name] for name in scores if point_of[name] is not None}
    stopped = {}
    for name in sorted((n for n in ahead if ahead[n] < threshold), key=lambda n: (-scores[n], n)):
        points_after = len({point for s, point in alive.items() if s != name})
        if points_after < len(set(alive.values())) and points_after < min_points:
            continue
        alive.pop(name, None)
        stopped[name] = f'P(beats {leader}) = {ahead[name]:.3f} < {threshold:g}'
    return stopped
