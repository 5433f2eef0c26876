"""Closeness and diversity of a generated image set against real images, in some feature space.

Density and coverage (Naeem et al. 2020, k nearest neighbours of the real features): density ~ how many real
neighbourhoods a generated point falls into (fidelity, about 1 for matching distributions), coverage = the share
of real points whose neighbourhood holds a generated point (diversity). numpy only, so `fgs-client sweep` and the
lab's experiments compute them the same way.
"""

from __future__ import annotations

import numpy as np


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(density, coverage) of fake features [M, d] against real features [N, d] with k nearest neighbours.

    With N <= k real points (a Few class), k shrinks to N - 1 so the neighbourhoods still exist; N = 1 gives nan.
    """
    k = min(k, len(real) - 1)
    if k < 1 or len(fake) == 0:
        return float("nan"), float("nan")
    radii = np.sort(pairwise_distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    inside = pairwise_distances(real, fake) < radii[:, None]  # [N real, M fake]
    density = float(inside.sum() / (k * len(fake)))
    coverage = float(inside.any(axis=1).mean())
    return density, coverage
