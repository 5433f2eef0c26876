"""Training utilities against hand-computed values: Balanced Softmax, shot and group accuracy, the real/synthetic
sampler."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fgs_client.dataset_writer import ManifestRow, write_manifest
from fgs_client.training import (
    ManifestDataset,
    RealSyntheticBatchSampler,
    balanced_softmax_loss,
    class_embedding_statistics,
    group_accuracy,
    shot_accuracy,
    subpop_group_ids,
)


def test_balanced_softmax_loss_hand_computed():
    # counts [3, 1]: prior [0.75, 0.25]; equal logits -> p(class 0) = 0.75 -> loss = -log 0.75
    loss = balanced_softmax_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), [3, 1])
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # a uniform prior is plain cross-entropy: logits [1, 0], label 1 -> log(1 + e)
    loss = balanced_softmax_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), [5, 5])
    assert loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    # mean over a batch of both
    loss = balanced_softmax_loss(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]), [3, 1])
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-6)


def test_balanced_softmax_class_without_images_stays_finite():
    # count 0 is taken as 1: prior [1/3, 2/3]; equal logits, label 0 -> -log(1/3)
    loss = balanced_softmax_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), [0, 2])
    assert loss.item() == pytest.approx(math.log(3), abs=1e-6)
    with pytest.raises(ValueError, match="3 entries"):
        balanced_softmax_loss(torch.zeros(1, 2), torch.tensor([0]), [1, 2, 3])
    # frequencies work as counts do; a class absent from them counts as the rarest one present: prior [0.2, 0.8]
    loss = balanced_softmax_loss(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([0]), [0.0, 0.2, 0.8])
    assert loss.item() == pytest.approx(-math.log(0.2 / 1.2), abs=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        balanced_softmax_loss(torch.zeros(1, 2), torch.tensor([0]), [0, 0])


def test_shot_accuracy_hand_computed():
    train_counts = [150, 50, 5]  # many, medium, few
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2, 2, 1])
    result = shot_accuracy(predictions, labels, train_counts)
    assert (result.many, result.medium, result.few) == (0.5, 1.0, 0.5)
    assert result.overall == 5 / 8
    assert (result.many_classes, result.medium_classes, result.few_classes) == (1, 1, 1)
    # logits are accepted too (argmax)
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    assert shot_accuracy(logits, labels, train_counts) == result


def test_shot_thresholds_boundaries_and_configurable():
    labels = np.array([0, 1, 2, 3])
    predictions = np.array([0, 1, 0, 0])  # classes 0, 1 right; 2, 3 wrong
    result = shot_accuracy(predictions, labels, [101, 100, 20, 19])
    assert (result.many, result.medium, result.few) == (1.0, 0.5, 0.0)  # 100 and 20 are medium
    custom = shot_accuracy(predictions, labels, [101, 100, 20, 19], many_threshold=99, few_threshold=21)
    assert (custom.many, custom.few) == (1.0, 0.0) and math.isnan(custom.medium)
    assert (custom.many_classes, custom.medium_classes, custom.few_classes) == (2, 0, 2)
    empty = shot_accuracy(np.array([0]), np.array([0]), [500])
    assert math.isnan(empty.few) and math.isnan(empty.medium) and empty.many == 1.0


def test_group_accuracy_subpopbench_definitions():
    labels = torch.tensor([0, 0, 1, 1, 1])
    attributes = torch.tensor([0, 1, 0, 0, 1])
    groups = subpop_group_ids(labels, attributes, num_attributes=2)
    assert groups.tolist() == [0, 1, 2, 2, 3]
    predictions = torch.tensor([0, 1, 1, 0, 1])  # correct: 1, 0, 1, 0, 1
    result = group_accuracy(predictions, labels, groups)
    assert result.per_group == {0: 1.0, 1: 0.0, 2: 0.5, 3: 1.0}
    assert result.worst_group == 0.0 and result.worst_group_id == 1
    assert result.mean_group == pytest.approx(0.625)
    assert result.overall == pytest.approx(0.6)


def test_sampler_ratio_and_class_balance_over_1000_batches():
    rng = np.random.default_rng(0)
    real_counts = [400, 120, 30, 8, 2]
    synthetic_counts = [0, 280, 370, 392, 398]  # the largest class got nothing: real only
    labels, synthetic = [], []
    for c, (r, s) in enumerate(zip(real_counts, synthetic_counts, strict=False)):
        labels += [c] * (r + s)
        synthetic += [False] * r + [True] * s
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    synthetic = [synthetic[i] for i in order]

    sampler = RealSyntheticBatchSampler(labels, synthetic, batch_size=100, real_fraction=0.5, num_batches=1000, seed=3)
    batches = list(sampler)

    assert len(batches) == 1000
    class_counts = Counter()
    for batch in batches:
        assert len(batch) == 100
        assert sum(synthetic[i] for i in batch) == 50  # exactly 50/50 in every batch
        class_counts.update(labels[i] for i in batch)
    for c in range(5):
        assert abs(class_counts[c] / 100_000 - 0.2) / 0.2 < 0.02, class_counts
    # the prior for balanced_softmax_loss: what the batches draw (uniform here), not the real counts
    assert sampler.class_frequencies.tolist() == pytest.approx([0.2] * 5)
    # every example of a small class gets drawn: draws are spread within a class
    drawn = {i for batch in batches for i in batch}
    assert all(i in drawn for i, label in enumerate(labels) if label == 4 and not synthetic[i])


def test_sampler_other_ratio_and_reproducible():
    labels = [0, 0, 1, 1, 0, 1]
    synthetic = [False, True, False, True, True, True]
    a = list(RealSyntheticBatchSampler(labels, synthetic, batch_size=8, real_fraction=0.25, num_batches=50, seed=1))
    b = list(RealSyntheticBatchSampler(labels, synthetic, batch_size=8, real_fraction=0.25, num_batches=50, seed=1))
    assert a == b
    assert all(sum(synthetic[i] for i in batch) == 6 for batch in a)
    # both classes have both sources: balanced, so the batches' prior is uniform
    frequencies = RealSyntheticBatchSampler(labels, synthetic, batch_size=8, real_fraction=0.25).class_frequencies
    assert frequencies.tolist() == pytest.approx([0.5, 0.5])
    # infeasible (class 1 real only, class 0 synthetic only, 6 of 8 synthetic): each half balanced on its own
    with pytest.warns(UserWarning, match="each half"):
        halves = RealSyntheticBatchSampler([0, 1], [True, False], batch_size=8, real_fraction=0.25)
    assert halves.class_frequencies.tolist() == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="no synthetic"):
        RealSyntheticBatchSampler([0, 1], [False, False], batch_size=4)


def test_class_embedding_statistics_delegates_to_hardness_stats():
    torch.manual_seed(0)
    embeddings = torch.cat([torch.randn(40, 3) + 5, torch.randn(40, 3) - 5])
    labels = torch.tensor([0] * 40 + [1] * 40)
    stats = class_embedding_statistics(embeddings, labels, num_classes=2)
    assert stats.means.shape == (2, 3) and stats.precisions.shape == (2, 3, 3) and stats.logdets.shape == (2,)
    assert torch.allclose(stats.means[0], embeddings[:40].mean(0), atol=1e-5)
    assert stats.counts.tolist() == [40, 40]


def test_manifest_dataset_reads_images_and_labels(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "r.png")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "s.png")
    write_manifest(
        tmp_path,
        [
            ManifestRow("r.png", 1, "cat", "autumn", "real"),
            ManifestRow(
                "s.png",
                0,
                "dog",
                "dim",
                "synthetic",
                seed="5",
                criterion="none",
                omega="0.0",
                gamma="3.0",
                dropout_p="0.0",
                job_id="j1",
            ),
        ],
    )
    dataset = ManifestDataset(tmp_path, return_group=True)
    assert len(dataset) == 2 and dataset.labels == [1, 0] and dataset.is_synthetic == [False, True]
    image, label, group = dataset[0]
    assert image.shape == (3, 4, 4) and label == 1 and group == "autumn"
    assert image[0].max().item() == 1.0 and image[2].max().item() == 0.0
    assert dataset.class_counts("real").tolist() == [0, 1]
    assert len(ManifestDataset(tmp_path, source="synthetic")) == 1
