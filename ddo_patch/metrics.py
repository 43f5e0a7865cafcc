"""Metric math shared by the adapters, the benchmarks and the demo: Frechet distance, coverage."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.spatial

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
    real_tree = scipy.spatial.cKDTree(real)
    radii = real_tree.query(real, k=k + 1)[0][:, -1]  # k+1: the nearest point is the sample itself
    nearest_fake = scipy.spatial.cKDTree(fake).query(real, k=1)[0]
    return float(np.mean(nearest_fake <= radii))
