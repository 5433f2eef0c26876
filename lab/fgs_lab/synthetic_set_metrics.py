"""Closeness and diversity of a synthetic image set against real images, in a feature space (paper Table 2).

- Fréchet distance (FID's formula) between Gaussian fits of the two feature sets: lower = closer.
- Density and coverage (Naeem et al. 2020, k nearest neighbours of the real features): density ~ how many real
  neighbourhoods a synthetic point falls into (fidelity, 1 for matching distributions), coverage = the share of real
  points whose neighbourhood holds a synthetic point (diversity).
The features here are the hidden layer of a digit classifier trained on generator-split digits
(fgs_lab.digits_model_evaluation.original_style_classifier): it never saw a Digits-LT test digit.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from fgs_client.set_metrics import density_coverage  # noqa: F401  (one definition, shared with fgs-client sweep)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) of features [N, d] and [M, d]."""
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root, _ = linalg.sqrtm(cov_r @ cov_f, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularise both, as the reference FID code does
        offset = np.eye(len(cov_r)) * 1e-6
        root = linalg.sqrtm((cov_r + offset) @ (cov_f + offset))
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2.0 * np.real(root)))
