"""What the sampler asks of the team's classifier, and the one place it is computed.

The sampler needs two things of a classifier f_phi: the criterion C(f_phi(pixels)) of each image with its
gradient dC/dpixels (the feedback term of Eq. 1; the sampler carries that gradient on through the decode and
Eq. 11 to z_t), and the final scores of finished images. `criterion_and_gradient` and `score` compute them on a
loaded classifier. A worker never calls them in its own process: it runs them in the classifier's confined child
(fgs_worker.confined_classifier, whose child is fgs_worker.classifier_child). `InProcessClassifier` calls them
directly; it is the baseline of bench/confined_classifier.py and what the sampler makes of a bare
LoadedClassifier (the sampler's tests, bench/ and lab/), never a worker setting.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fgs_classifier.registry import LoadedClassifier
from fgs_common.wire import ClassifierSpec, Criterion
from fgs_worker.guidance import criteria


class FeedbackClassifier(Protocol):
    """A classifier as the sampler sees it."""

    spec: ClassifierSpec
    has_hardness_stats: bool

    def criterion_and_gradient(
        self, pixels: torch.Tensor, criterion: Criterion, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(C [B], dC/dpixels [B, 3, H, W]) of pixels [B, 3, H, W] in [0, 1]."""

    def score(
        self, pixels: torch.Tensor, criterion: Criterion, labels: torch.Tensor
    ) -> tuple[list[float] | None, list[list[float]]]:
        """(C of each image, None for criterion 'none'; the softmax of each image)."""


def criterion_and_gradient(
    classifier: LoadedClassifier, pixels: torch.Tensor, criterion: Criterion, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """C of each image and dC/dpixels: forward, criterion, backward. Images are independent, so the gradient of
    the sum is each image's own gradient."""
    with torch.enable_grad():
        inputs = pixels.detach().requires_grad_(True)
        logits, embedding = classifier(inputs)
        values = criteria.evaluate(criterion, logits, labels, embedding, classifier.hardness_stats)
        (gradient,) = torch.autograd.grad(values.sum(), inputs)
    return values.detach(), gradient


@torch.no_grad()
def score(
    classifier: LoadedClassifier, pixels: torch.Tensor, criterion: Criterion, labels: torch.Tensor
) -> tuple[list[float] | None, list[list[float]]]:
    """Criterion value (None for criterion 'none') and class probabilities of images [B, 3, H, W] in [0, 1]."""
    logits, embedding = classifier(pixels.to(classifier.device))
    probabilities = torch.softmax(logits.float(), dim=-1).tolist()
    if criterion is Criterion.none:
        return None, probabilities
    values = criteria.evaluate(criterion, logits, labels, embedding, classifier.hardness_stats)
    return values.tolist(), probabilities


class InProcessClassifier:
    """A LoadedClassifier run in the calling process (tests, lab, the bench's baseline; never a worker's)."""

    def __init__(self, classifier: LoadedClassifier):
        self.classifier = classifier
        self.spec = classifier.spec
        self.has_hardness_stats = classifier.hardness_stats is not None

    def criterion_and_gradient(self, pixels, criterion, labels):
        return criterion_and_gradient(self.classifier, pixels, criterion, labels)

    def score(self, pixels, criterion, labels):
        return score(self.classifier, pixels, criterion, labels)


def as_feedback_classifier(classifier: FeedbackClassifier | LoadedClassifier | None) -> FeedbackClassifier | None:
    """A bare LoadedClassifier runs in process; anything else is already a FeedbackClassifier (or None)."""
    return InProcessClassifier(classifier) if isinstance(classifier, LoadedClassifier) else classifier
