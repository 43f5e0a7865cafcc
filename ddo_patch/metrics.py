"""Metric math shared by the adapters, the benchmarks and the demo: Frechet distance, coverage, precision and
recall, class consistency, and paired differences over training seeds."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.spatial
import scipy.spatial.distance

from ddo_patch.errors import DDOPatchError


def feature_statistics(features: np.ndarray):
    """Mean and covariance of features [N, D] in float64, as FID uses them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DDOPatchError(f'need at least two feature vectors [N, D] for statistics, got shape {features.shape}')
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): FID's formula, on any feature space."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DDOPatchError(f'feature statistics do not match: {mu1.shape} vs {mu2.shape}; compute both with the same detector')
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> float:
    """Coverage of Naeem et al. 2020: the fraction of real samples whose k-NN ball (radius = distance to
    the k-th nearest other real sample) contains at least one fake sample. A recall-side metric that,
    unlike recall, is not fooled by a few outliers."""
    nearest_fake = scipy.spatial.cKDTree(fake).query(real, k=1)[0]
    return float(np.mean(nearest_fake <= _kth_neighbour_radii(real, k)))


def _kth_neighbour_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point of the same set."""
    if len(points) <= k:
        raise DDOPatchError(f'need more than k = {k} feature vectors for k-NN manifolds, got {len(points)}')
    return scipy.spatial.cKDTree(points).query(points, k=k + 1)[0][:, -1]  # k+1: the nearest point is the point itself


def _inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each point: does it lie in the ball of radius radii[j] around some centres[j]?"""
    inside = np.zeros(len(points), dtype=bool)
    for i in range(0, len(points), chunk):
        distances = scipy.spatial.distance.cdist(points[i:i + chunk], centres)
        inside[i:i + chunk] = (distances <= radii[None, :]).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple:
    """Improved precision and recall of Kynkaanniemi et al. 2019, in any feature space: each set's manifold is the
    union of balls around its points with radius the distance to the k-th nearest neighbour in the set (k = 3, as
    the paper); precision is the fraction of fake samples inside the real manifold (are samples realistic?),
    recall the fraction of real samples inside the fake manifold (is the data covered?). Both depend on the two
    sample counts (a larger set has smaller balls): compare models at the same counts."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DDOPatchError(f'real and fake features must be [N, D] with the same D, got {real.shape} and {fake.shape}')
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k)).mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k)).mean()
    return float(precision), float(recall)


def class_consistency(predicted, labels) -> float:
    """The fraction of class-conditional samples that a classifier assigns to their conditioning label."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.size == 0:
        raise DDOPatchError(f'need one prediction per label, got {predicted.shape} predictions for {labels.shape} labels')
    return float(np.mean(predicted == labels))


def across_seeds(differences, standard_errors) -> dict:
    """A paired difference (model a - model b, one value per training seed, each with its sampling standard error)
    summarised over the seeds: its mean, the per-seed values, their spread, and the standard error of the mean, the
    larger of the spread's (training and sampling noise together, std / sqrt(n)) and the pooled sampling error
    (sqrt(mean se^2 / n); the only estimate with one seed)."""
    values = np.asarray(differences, dtype=np.float64)
    errors = np.asarray(standard_errors, dtype=np.float64)
    if values.ndim != 1 or values.shape != errors.shape or values.size == 0:
        raise DDOPatchError(f'need one standard error per difference, got {values.shape} and {errors.shape}')
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    sampling = float(np.sqrt(np.mean(errors ** 2) / values.size))
    return dict(mean=float(values.mean()), per_seed=values.tolist(), spread=spread, sampling_se=sampling,
                se=max(spread / values.size ** 0.5, sampling))
