"""Per-class embedding statistics for the hardness score (paper Eq. 5, App. G).

The paper pre-computes the mean and the inverse covariance of the classifier's embedding for every class over
the real training set. Long-tailed classes have a handful of images (ImageNet-LT: 5), far fewer than the
embedding dimension, so the sample covariance is singular. We shrink each class covariance towards the pooled
within-class covariance (itself Ledoit-Wolf shrunk towards a scaled identity), with the Ledoit-Wolf optimal
intensity, so that a 5-image class gets mostly the pooled shape and a 1000-image class mostly its own.
Log-determinants come from a Cholesky factor (never `det`, which under/overflows in high dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _ledoit_wolf_intensity(centered: torch.Tensor, sample_cov: torch.Tensor, target: torch.Tensor) -> float:
    """Ledoit-Wolf shrinkage intensity towards `target` for samples `centered` (n x k, already centred)."""
    n = centered.shape[0]
    if n < 2:
        return 1.0
    # pi-hat: sum of the variances of the entries of the sample covariance, estimated from the samples.
    outer = centered[:, :, None] * centered[:, None, :]
    pi_hat = ((outer - sample_cov) ** 2).sum(dim=(1, 2)).mean() / n
    gamma_hat = ((sample_cov - target) ** 2).sum()
    if gamma_hat <= 0:
        return 1.0
    return float(torch.clamp(pi_hat / gamma_hat, 0.0, 1.0))


@dataclass
class HardnessStats:
    """Class means mu_y, precisions Sigma_y^-1 and log det Sigma_y of a classifier's embedding (Eq. 5)."""

    means: torch.Tensor  # [K, k]
    precisions: torch.Tensor  # [K, k, k]
    logdets: torch.Tensor  # [K]
    counts: torch.Tensor  # [K] training images per class the statistics came from

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        shrinkage: float | None = None,
    ) -> "HardnessStats":
        """Estimate the statistics from real-image embeddings [N, k] and labels [N].

        `shrinkage` fixes the weight of the pooled covariance for every class; None picks it per class
        (Ledoit-Wolf). A class without any image gets the pooled covariance and the global mean.
        """
        if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError("embeddings must be [N, k] and labels [N]")
        if embeddings.shape[0] < 2:
            raise ValueError("need at least 2 embeddings to estimate covariances")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        x = embeddings.detach().to(torch.float64)
        labels = labels.detach().long()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes})")
        k = x.shape[1]
        counts = torch.bincount(labels, minlength=num_classes)
        means = torch.zeros(num_classes, k, dtype=torch.float64)
        means.index_add_(0, labels, x)
        present = counts > 0
        means[present] /= counts[present, None]
        means[~present] = x.mean(0)

        centered = x - means[labels]
        pooled = centered.T @ centered / x.shape[0]
        identity_target = torch.eye(k, dtype=torch.float64) * torch.trace(pooled) / k
        lam = _ledoit_wolf_intensity(centered, pooled, identity_target)
        pooled = lam * identity_target + (1 - lam) * pooled

        covariances = torch.empty(num_classes, k, k, dtype=torch.float64)
        for y in range(num_classes):
            members = centered[labels == y]
            if members.shape[0] == 0:
                covariances[y] = pooled
                continue
            sample_cov = members.T @ members / members.shape[0]
            weight = shrinkage if shrinkage is not None else _ledoit_wolf_intensity(members, sample_cov, pooled)
            covariances[y] = weight * pooled + (1 - weight) * sample_cov
        # A tiny ridge keeps the Cholesky factorisation defined for exactly singular inputs.
        ridge = 1e-9 * torch.diagonal(pooled).mean().clamp_min(1e-12)
        covariances += ridge * torch.eye(k, dtype=torch.float64)
        chol = torch.linalg.cholesky(covariances)
        precisions = torch.cholesky_inverse(chol)
        logdets = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return cls(means=means.float(), precisions=precisions.float(), logdets=logdets.float(), counts=counts)

    def save(self, path: Path) -> None:
        save_file(
            {
                "means": self.means.contiguous(),
                "precisions": self.precisions.contiguous(),
                "logdets": self.logdets.contiguous(),
                "counts": self.counts.contiguous(),
            },
            str(path),
            metadata={"format": "fgs-hardness-stats-v1"},
        )

    @classmethod
    def load(cls, path: Path) -> "HardnessStats":
        """Load statistics saved by `save` (safetensors: no pickle). Raises ValueError when malformed."""
        tensors = load_file(str(path))
        missing = {"means", "precisions", "logdets"} - tensors.keys()
        if missing:
            raise ValueError(f"hardness statistics lack {sorted(missing)}")
        means, precisions, logdets = tensors["means"], tensors["precisions"], tensors["logdets"]
        num_classes, k = means.shape
        if precisions.shape != (num_classes, k, k) or logdets.shape != (num_classes,):
            raise ValueError(
                f"hardness statistics shapes disagree: means {tuple(means.shape)}, "
                f"precisions {tuple(precisions.shape)}, logdets {tuple(logdets.shape)}"
            )
        counts = tensors.get("counts", torch.zeros(num_classes, dtype=torch.long))
        return cls(means=means.float(), precisions=precisions.float(), logdets=logdets.float(), counts=counts)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "HardnessStats":
        return HardnessStats(
            means=self.means.to(device, dtype),
            precisions=self.precisions.to(device, dtype),
            logdets=self.logdets.to(device, dtype),
            counts=self.counts,
        )
