"""Feedback criteria C(x, y, f_phi) of the paper's section 2.1.1, one value per image.

Feedback-guided sampling ascends C (Eq. 1): higher loss, higher entropy, higher hardness all mean a sample the
classifier finds harder, i.e. more useful to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fgs_classifier.hardness_stats import HardnessStats
from fgs_common.wire import Criterion
from fgs_worker.guidance.precision import at_least_float32


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 2: cross-entropy L(f_phi(x), y). Ascending it is descending log p_phi(y|x) (Eq. 3)."""
    return F.cross_entropy(logits, labels, reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 4: H(f_phi(x)) = -sum_c p_c log p_c of the classifier's softmax."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def hardness(embedding: torch.Tensor, labels: torch.Tensor, stats: HardnessStats) -> torch.Tensor:
    """Eq. 5: 1/2 [(e - mu_y)^T Sigma_y^-1 (e - mu_y) + ln det Sigma_y + k ln 2 pi].

    The statistics read only the classes in `labels` and score in float64 (fgs_classifier.hardness_stats); the
    value and its gradient come back in the embedding's dtype.
    """
    return stats.score(embedding, labels)


def evaluate(
    criterion: Criterion,
    logits: torch.Tensor,
    labels: torch.Tensor,
    embedding: torch.Tensor | None = None,
    stats: HardnessStats | None = None,
) -> torch.Tensor:
    """C for each image of a batch: logits [B, K], labels [B] -> [B], in float32 at least.

    16-bit logits and embeddings are upcast first (a classifier loaded in 16 bits): log-softmax over K classes
    and the Mahalanobis sum over k dimensions are sums that 16 bits round coarsely (fgs_worker.guidance.precision).
    """
    logits = at_least_float32(logits)
    if criterion is Criterion.loss:
        return loss(logits, labels)
    if criterion is Criterion.entropy:
        return entropy(logits)
    if criterion is Criterion.hardness:
        if embedding is None or stats is None:
            raise ValueError("criterion 'hardness' needs the classifier embedding and hardness statistics")
        return hardness(at_least_float32(embedding), labels, stats)
    if criterion is Criterion.none:
        return torch.zeros(logits.shape[0], device=logits.device)
    raise ValueError(f"unknown criterion {criterion!r}")
