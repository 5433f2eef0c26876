"""The fit of the hardness statistics (paper Eq. 5, App. G): two streaming passes over the embeddings, class by class.

Notation and estimator: `fgs_classifier.hardness_stats` (P the Ledoit-Wolf shrunk pooled covariance, w_y each
class's weight on it, W_y its factor, Q_y and s_y from W_y's thin SVD).

Memory. The Ledoit-Wolf pi term, (1/n^2) sum_i ||x_i x_i^T - S||_F^2, would need [n, k, k] outer products. With
centred x_i and S = (1/n) sum_i x_i x_i^T it has the closed form (sum_i ||x_i||^4 - n ||S||_F^2) / n^2, and
||S_y||_F = ||X_y X_y^T||_F / n_y (the n_y x n_y Gram matrix), tr(S_y P) = ||X_y V Lambda^1/2||_F^2 / n_y. The
fit streams the embeddings class by class, twice (pass 1: means, pooled scatter; pass 2: one class's factor at a
time), holding O(n_y k + k^2) numbers: at ImageNet-LT scale (k = 2,048) well under a gigabyte, never the
115,846 x 2,048 x 2,048 outer products (3.9 TB) nor the 1,000 dense k x k precisions (16.8 GB in float32).
Each tensor is handed to `put` as soon as it is computed (a file writer, or a dict), in float64 or int64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# rho = RIDGE * mean(diag P): only keeps Cholesky/eigh defined for exactly singular inputs (as in v1 of this file).
RIDGE = 1e-9
_F64 = torch.float64

ClassEmbeddings = Callable[[int], torch.Tensor]
"""Class index y -> that class's embeddings [n_y, k]; called twice per class (the fit's two passes)."""

PutTensor = Callable[[str, torch.Tensor], None]
"""Where the fit hands each tensor of the file's layout (`fgs_common.hardness_stats_format.layout`), by name."""


def _ledoit_wolf_intensity(n: int, fourth_moment_sum: float, cov_norm2: float, distance2: float) -> float:
    """Ledoit-Wolf intensity pi/gamma clipped to [0, 1] (Lemma 3.2-3.4), from moments of n centred samples.

    pi    = (1/n^2) sum_i ||x_i x_i^T - S||_F^2 = (sum_i ||x_i||^4 - n ||S||_F^2) / n^2   (S = (1/n) sum x_i x_i^T)
    gamma = ||S - target||_F^2 = `distance2`
    """
    if n < 2:
        return 1.0
    pi_hat = (fourth_moment_sum - n * cov_norm2) / n**2
    if distance2 <= 0:
        return 1.0
    return min(max(pi_hat / distance2, 0.0), 1.0)


def _gram_norm2(centered: torch.Tensor) -> float:
    """||X^T X||_F^2 = ||X X^T||_F^2, through whichever of the two is smaller."""
    gram = centered @ centered.T if centered.shape[0] <= centered.shape[1] else centered.T @ centered
    return float(gram.square().sum())


def check_fit_arguments(total: int, shrinkage: float | None) -> None:
    """Refuse fewer than 2 embeddings in all, or a fixed shrinkage outside [0, 1]."""
    if total < 2:
        raise ValueError("need at least 2 embeddings to estimate covariances")
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")


def embeddings_by_class(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None
) -> tuple[list[int], ClassEmbeddings]:
    """Per-class counts and a `ClassEmbeddings` over in-memory embeddings [N, k] with labels [N], once the
    arguments are checked."""
    if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError("embeddings must be [N, k] and labels [N]")
    check_fit_arguments(embeddings.shape[0], shrinkage)
    labels = labels.detach().long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    starts = [0] + torch.tensor(counts).cumsum(0).tolist()
    return counts, lambda y: embeddings[order[starts[y] : starts[y + 1]]]


@dataclass
class _PooledTarget:
    """P = V Lambda V^T, shared by every class, and the ridge rho."""

    eigenvalues: torch.Tensor  # Lambda [k]
    eigenvectors: torch.Tensor  # V [k, k]
    ridge: float

    @property
    def norm2(self) -> float:
        return float(self.eigenvalues.square().sum())  # ||P||_F^2


def _class_moments(
    embeddings_of: ClassEmbeddings, counts: Sequence[int], dim: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pass 1: class means, the pooled within-class scatter and sum_i ||x_i - mu_y||^4 (for its intensity)."""
    means = torch.zeros(len(counts), dim, dtype=_F64)
    scatter = torch.zeros(dim, dim, dtype=_F64)
    fourth_moment_sum = 0.0
    for y, count in enumerate(counts):
        if count == 0:
            continue
        x = embeddings_of(y)
        means[y] = x.mean(0)
        centered = x - means[y]
        scatter.addmm_(centered.T, centered)
        fourth_moment_sum += float(centered.square().sum(1).square().sum())
        del x, centered
    present = torch.tensor([c > 0 for c in counts])
    counts_tensor = torch.tensor(list(counts), dtype=torch.int64)
    # A class without any image gets the global mean (and the pooled covariance, below).
    means[~present] = (counts_tensor[present, None].to(_F64) * means[present]).sum(0) / int(sum(counts))
    return means, scatter, fourth_moment_sum


def _pooled_target(scatter: torch.Tensor, total: int, fourth_moment_sum: float) -> _PooledTarget:
    """The pooled covariance, Ledoit-Wolf shrunk towards tr(S)/k I, and its eigendecomposition."""
    dim = scatter.shape[0]
    pooled = scatter.div_(total)
    identity_scale = float(torch.trace(pooled)) / dim
    pooled_norm2 = float(pooled.square().sum())
    distance2 = float((pooled - identity_scale * torch.eye(dim, dtype=_F64)).square().sum())
    lam = _ledoit_wolf_intensity(total, fourth_moment_sum, pooled_norm2, distance2)
    target = pooled.mul_(1 - lam)
    target.diagonal().add_(lam * identity_scale)
    ridge = RIDGE * max(float(target.diagonal().mean()), 1e-12)
    eigenvalues, eigenvectors = torch.linalg.eigh(target)
    del target, pooled
    # P is positive semi-definite; eigh may return -1e-17
    return _PooledTarget(eigenvalues.clamp_min(0.0), eigenvectors, ridge)


def _class_weight(centered: torch.Tensor, rotated: torch.Tensor, target: _PooledTarget) -> float:
    """w_y: class y's Ledoit-Wolf intensity towards P, from its centred embeddings and their rotation V^T x."""
    n = centered.shape[0]
    class_norm2 = _gram_norm2(centered) / n**2  # ||S_y||_F^2
    cross = float((rotated.square() * target.eigenvalues).sum()) / n  # tr(S_y P)
    fourth = float(centered.square().sum(1).square().sum())
    return _ledoit_wolf_intensity(n, fourth, class_norm2, class_norm2 - 2 * cross + target.norm2)


def _class_factor(
    rotated: torch.Tensor | None, n: int, weight: float, target: _PooledTarget, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D_y, and Q_y [k, rank] with s_y^2 [rank] from the thin SVD of W_y (zero-padded past the numerical rank)."""
    dim = target.eigenvalues.shape[0]
    diagonal = weight * target.eigenvalues + target.ridge  # D_y
    basis = torch.zeros(dim, rank, dtype=_F64)
    spectrum = torch.zeros(rank, dtype=_F64)
    if rank > 0 and weight < 1.0:
        factor = (rotated * math.sqrt((1 - weight) / n) / diagonal.sqrt()).T  # W_y, k x n_y
        left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
        # Numerical rank as numpy.linalg.matrix_rank: smaller singular values are rounding noise of zero.
        keep = singular[:rank] > singular.max() * max(factor.shape) * torch.finfo(_F64).eps
        kept = int(keep.sum())
        basis[:, :kept] = left[:, :kept]
        spectrum[:kept] = singular[:kept].square()
    return diagonal, basis, spectrum


def fit_statistics(
    class_embeddings: ClassEmbeddings, counts: Sequence[int], dim: int, shrinkage: float | None, put: PutTensor
) -> None:
    """The two streaming passes; hands every tensor of the file's layout to `put`."""
    num_classes, total = len(counts), int(sum(counts))

    def embeddings_of(y: int) -> torch.Tensor:
        x = class_embeddings(y)
        if x.ndim != 2 or x.shape != (counts[y], dim):
            raise ValueError(f"class {y}: embeddings of shape {tuple(x.shape)}, expected ({counts[y]}, {dim})")
        return x.detach().to("cpu", _F64)

    # 1. Pass 1: class means and the pooled within-class scatter.
    means, scatter, fourth_moment_sum = _class_moments(embeddings_of, counts, dim)
    # 2. The target P = V Lambda V^T for all classes.
    target = _pooled_target(scatter, total, fourth_moment_sum)
    del scatter
    put("counts", torch.tensor(list(counts), dtype=torch.int64))
    put("target_eigenvalues", target.eigenvalues)
    put("ridge", torch.tensor(target.ridge, dtype=_F64))
    put("target_eigenvectors", target.eigenvectors)
    put("means", means)

    # 3. Pass 2, one class at a time: its intensity w_y, the factor W_y and its thin SVD (hardness_stats' docstring).
    logdets = torch.empty(num_classes, dtype=_F64)
    weights = torch.ones(num_classes, dtype=_F64)
    for y in range(num_classes):
        n, rank = counts[y], max(min(counts[y] - 1, dim), 0)
        weight, rotated = 1.0, None
        if n > 0:
            centered = embeddings_of(y) - means[y]
            rotated = centered @ target.eigenvectors  # rows V^T (x_i - mu_y)
            weight = shrinkage if shrinkage is not None else _class_weight(centered, rotated, target)
            del centered
        diagonal, basis, spectrum = _class_factor(rotated, n, weight, target, rank)
        logdets[y] = diagonal.log().sum() + torch.log1p(spectrum).sum()
        weights[y] = weight
        put(f"class_spectrum.{y}", spectrum)
        put(f"class_basis.{y}", basis)
        del rotated
    put("logdets", logdets)
    put("target_weights", weights)
