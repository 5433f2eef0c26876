"""Hardness statistics (Eq. 5) in the factored, class-by-class format against the former dense computation.

`dense_reference` below is the dense fit this package used before issue 13 (an [n, k, k] Ledoit-Wolf term and a
k x k precision per class), kept here only as the reference: the package must reproduce it to 1e-5 relative.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fgs_classifier.hardness_stats import FORMAT, HardnessStats
from fgs_common.exceptions import InvalidHardnessStats
from fgs_common.wire import Criterion
from fgs_worker.guidance import criteria

TOLERANCE = 1e-5


def _dense_ledoit_wolf_intensity(centered: torch.Tensor, sample_cov: torch.Tensor, target: torch.Tensor) -> float:
    n = centered.shape[0]
    if n < 2:
        return 1.0
    outer = centered[:, :, None] * centered[:, None, :]
    pi_hat = ((outer - sample_cov) ** 2).sum(dim=(1, 2)).mean() / n
    gamma_hat = ((sample_cov - target) ** 2).sum()
    if gamma_hat <= 0:
        return 1.0
    return float(torch.clamp(pi_hat / gamma_hat, 0.0, 1.0))


def dense_reference(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None = None):
    """The pre-issue-13 HardnessStats.fit, verbatim but for returning float64: means, precisions, logdets, counts."""
    x = embeddings.detach().to(torch.float64)
    labels = labels.detach().long()
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
    lam = _dense_ledoit_wolf_intensity(centered, pooled, identity_target)
    pooled = lam * identity_target + (1 - lam) * pooled
    covariances = torch.empty(num_classes, k, k, dtype=torch.float64)
    for y in range(num_classes):
        members = centered[labels == y]
        if members.shape[0] == 0:
            covariances[y] = pooled
            continue
        sample_cov = members.T @ members / members.shape[0]
        weight = shrinkage if shrinkage is not None else _dense_ledoit_wolf_intensity(members, sample_cov, pooled)
        covariances[y] = weight * pooled + (1 - weight) * sample_cov
    ridge = 1e-9 * torch.diagonal(pooled).mean().clamp_min(1e-12)
    covariances += ridge * torch.eye(k, dtype=torch.float64)
    chol = torch.linalg.cholesky(covariances)
    precisions = torch.cholesky_inverse(chol)
    logdets = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return means, precisions, logdets, counts


def dense_hardness(embedding: torch.Tensor, labels: torch.Tensor, means, precisions, logdets) -> torch.Tensor:
    """The pre-issue-13 criteria.hardness (Eq. 5), in float64."""
    diff = embedding.to(torch.float64) - means[labels]
    mahalanobis = torch.einsum("bi,bij,bj->b", diff, precisions[labels], diff)
    return 0.5 * (mahalanobis + logdets[labels] + embedding.shape[-1] * math.log(2 * math.pi))


def synthetic_embeddings(k: int, counts: list[int], decay: float = 1.0, seed: int = 0):
    """Anisotropic class clusters: each class mixes a decaying spectrum with its own random rotation."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    rows, labels = [], []
    for y, n in enumerate(counts):
        mix = torch.randn(k, k, generator=generator, dtype=torch.float64) * 0.3 + torch.eye(k, dtype=torch.float64)
        centre = torch.randn(k, generator=generator, dtype=torch.float64) * 2
        rows.append(torch.randn(n, k, generator=generator, dtype=torch.float64) * scales @ mix + centre)
        labels += [y] * n
    return torch.cat(rows).float(), torch.tensor(labels), scales.float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.to(torch.float64) - reference).abs() / reference.abs().clamp_min(1e-300)).max().item()


CASES = {
    # k, class counts, shrinkage, spectrum decay
    "two tiny classes": (4, [5, 5], None, 1.0),
    "more images than dimensions": (16, [30] * 10, None, 1.0),
    "plain sample covariance": (16, [30] * 10, 0.0, 1.0),
    "long tail with 1- and 0-image classes": (32, [5, 3, 1, 0, 50, 200, 8], None, 1.0),
    "steep spectrum": (64, [5, 10, 40, 100, 300], None, 2.0),
    "fixed shrinkage": (64, [5, 10, 40, 100, 300], 0.05, 2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_dense_computation(case, tmp_path):
    k, counts, shrinkage, decay = CASES[case]
    embeddings, labels, scales = synthetic_embeddings(k, counts, decay)
    means, precisions, logdets, dense_counts = dense_reference(embeddings, labels, len(counts), shrinkage)

    in_memory = HardnessStats.fit(embeddings, labels, len(counts), shrinkage=shrinkage)
    order = torch.argsort(labels, stable=True)
    starts = [0] + torch.tensor(counts).cumsum(0).tolist()
    HardnessStats.fit_to_file(
        tmp_path / "streamed.safetensors",
        lambda y: embeddings[order[starts[y] : starts[y + 1]]],
        counts,
        k,
        shrinkage=shrinkage,
    )
    in_memory.save(tmp_path / "saved.safetensors")
    queries = torch.randn(4 * len(counts), k, generator=torch.Generator().manual_seed(1)) * scales
    query_labels = torch.arange(queries.shape[0]) % len(counts)
    queries = queries + means[query_labels].float()
    diff = queries.to(torch.float64) - means[query_labels]
    reference_mahalanobis = torch.einsum("bi,bij,bj->b", diff, precisions[query_labels], diff)

    reference_score = dense_hardness(queries, query_labels, means, precisions, logdets)
    reloaded = [HardnessStats.load(tmp_path / name) for name in ("streamed.safetensors", "saved.safetensors")]
    for stats in [in_memory, *reloaded]:
        assert stats.counts.tolist() == dense_counts.tolist()
        assert relative_error(stats.means, means) <= TOLERANCE
        assert relative_error(stats.logdets, logdets) <= TOLERANCE
        assert relative_error(stats.mahalanobis(queries, query_labels), reference_mahalanobis) <= TOLERANCE
        assert relative_error(stats.score(queries, query_labels), reference_score) <= TOLERANCE
    if shrinkage == 0.0:
        return  # Sigma_y here has condition number 3e8: float32 storage moves single entries of Sigma_y^-1 (not Eq. 5)
    # The dense view agrees too (elementwise, relative to each matrix's largest entry).
    dense_view = in_memory.precisions.to(torch.float64)
    scale = precisions.abs().amax(dim=(1, 2), keepdim=True)
    assert ((dense_view - precisions).abs() / scale).max().item() <= 1e-4


@pytest.mark.parametrize("case", ["long tail with 1- and 0-image classes", "steep spectrum"])
def test_criterion_value_and_gradient_equal_the_dense_computation(case):
    """What the sampler differentiates (criteria.evaluate with 'hardness', float32 embeddings) against Eq. 5 dense."""
    k, counts, shrinkage, decay = CASES[case]
    embeddings, labels, scales = synthetic_embeddings(k, counts, decay)
    means, precisions, logdets, _ = dense_reference(embeddings, labels, len(counts), shrinkage)
    stats = HardnessStats.fit(embeddings, labels, len(counts), shrinkage=shrinkage)
    query_labels = torch.arange(3 * len(counts)) % len(counts)
    noise = torch.randn(len(query_labels), k, generator=torch.Generator().manual_seed(2))
    start = means[query_labels].float() + noise * scales

    ours_input = start.clone().requires_grad_(True)
    logits = torch.zeros(len(query_labels), len(counts))
    value = criteria.evaluate(Criterion.hardness, logits, query_labels, ours_input, stats)
    (gradient,) = torch.autograd.grad(value.sum(), ours_input)
    assert value.dtype == torch.float32 and gradient.dtype == torch.float32

    reference_input = start.to(torch.float64).requires_grad_(True)
    reference = dense_hardness(reference_input, query_labels, means, precisions, logdets)
    (reference_gradient,) = torch.autograd.grad(reference.sum(), reference_input)
    assert relative_error(value.detach(), reference.detach()) <= TOLERANCE
    # Per image, relative to the gradient's norm (Sigma^-1 (e - mu): its small entries are differences).
    gradient_error = (gradient.to(torch.float64) - reference_gradient).norm(dim=1) / reference_gradient.norm(dim=1)
    assert gradient_error.max().item() <= TOLERANCE


def test_a_worker_reads_only_the_classes_it_scores(tmp_path):
    k, counts = 32, [40, 5, 300, 12]
    embeddings, labels, _ = synthetic_embeddings(k, counts)
    HardnessStats.fit(embeddings, labels, len(counts)).save(tmp_path / "stats.safetensors")
    stats = HardnessStats.load(tmp_path / "stats.safetensors", cached_classes=2)
    opened = stats.resident_bytes()
    assert opened < k * k * 4  # the header, counts, log-dets and target spectrum only

    stats.score(torch.randn(3, k), torch.tensor([1, 1, 1]))
    one_class = stats.resident_bytes()
    # V (k x k, float64) once, and class 1's mean, diagonal and basis (k x (5 - 1)) and damping.
    assert one_class - opened == k * k * 8 + (2 * k + k * 4 + 4) * 8
    stats.score(torch.randn(2, k), torch.tensor([0, 2]))
    stats.score(torch.randn(1, k), torch.tensor([3]))
    assert sorted(stats._classes) == [2, 3]  # least recently used first out


def test_statistics_deleted_while_loaded_stay_readable(tmp_path):
    """A classifier deleted by its tenant while a job scores with it: the job finishes (the API's promise)."""
    k, counts = 16, [20, 6, 30]
    embeddings, labels, _ = synthetic_embeddings(k, counts)
    fitted = HardnessStats.fit(embeddings, labels, len(counts))
    fitted.save(tmp_path / "stats.safetensors")
    stats = HardnessStats.load(tmp_path / "stats.safetensors", cached_classes=1)
    (tmp_path / "stats.safetensors").unlink()
    sample, classes = torch.randn(3, k), torch.tensor([0, 1, 2])  # every class read after the delete
    assert torch.allclose(stats.score(sample, classes), fitted.score(sample, classes))


@pytest.mark.stack  # a fresh interpreter measures its own memory
def test_streaming_fit_never_builds_the_dense_intensity_term(tmp_path):
    """[n, k, k] at n = 2,000 and k = 256 would be 1 GB in float64; the fit must stay far below that."""
    script = f"""
import resource, torch
from fgs_classifier.hardness_stats import HardnessStats
torch.set_num_threads(1)
counts = [1000, 600, 300, 100]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
HardnessStats.fit_to_file({str(tmp_path / "s.safetensors")!r},
                          lambda y: torch.randn(counts[y], 256, generator=torch.Generator().manual_seed(y)),
                          counts, 256)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 200 * 1024, f"the fit grew the process by {grown_kib / 1024:.0f} MiB"


def test_the_file_is_plain_safetensors(tmp_path):
    """What fit_to_file/save write, the safetensors library reads: the same tensors as HardnessStats reads."""
    embeddings, labels, _ = synthetic_embeddings(8, [6, 1, 0, 20])
    HardnessStats.fit(embeddings, labels, 4).save(tmp_path / "stats.safetensors")
    tensors = load_file(str(tmp_path / "stats.safetensors"))
    stats = HardnessStats.load(tmp_path / "stats.safetensors")
    assert {"means", "counts", "logdets", "target_eigenvectors", "class_basis.3", "class_spectrum.2"} <= tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(stats._read(name), tensor), name
    assert tensors["class_basis.3"].shape == (8, 8) and tensors["class_basis.2"].shape == (8, 0)


def test_old_dense_files_and_damaged_files_are_refused_with_a_clear_message(tmp_path):
    old = tmp_path / "v1.safetensors"
    save_file(
        {"means": torch.zeros(2, 3), "precisions": torch.eye(3).repeat(2, 1, 1), "logdets": torch.zeros(2)},
        str(old),
        metadata={"format": "fgs-hardness-stats-v1"},
    )
    with pytest.raises(InvalidHardnessStats, match="fgs-client hardness-stats"):
        HardnessStats.load(old)

    embeddings, labels, _ = synthetic_embeddings(8, [6, 6])
    good = tmp_path / "good.safetensors"
    HardnessStats.fit(embeddings, labels, 2).save(good)
    data = good.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["class_basis.9"] = header.pop("class_basis.1")  # a valid safetensors file, but class 1 has no basis
    assert header["__metadata__"]["format"] == FORMAT
    encoded = json.dumps(header).encode()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    with pytest.raises(InvalidHardnessStats, match="class 1's basis"):
        HardnessStats.load(damaged)


def test_fit_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="shrinkage"):
        HardnessStats.fit(torch.randn(10, 3), torch.arange(10) % 2, 2, shrinkage=1.5)
    with pytest.raises(ValueError, match="labels"):
        HardnessStats.fit(torch.randn(10, 3), torch.arange(10), 2)
    with pytest.raises(ValueError, match="expected"):
        HardnessStats.fit_to_file(tmp_path / "s.safetensors", lambda y: torch.randn(3, 4), [5, 5], 4)
