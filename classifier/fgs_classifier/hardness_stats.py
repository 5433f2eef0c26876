"""Per-class embedding statistics for the hardness score (paper Eq. 5, App. G), fitted and read at ImageNet-LT scale.

Eq. 5 needs, for every class y, the mean mu_y, the inverse covariance Sigma_y^-1 and ln det Sigma_y of the
classifier's k-dimensional embedding over the real training set.

Where we depart from the paper. The paper (Eq. 5, App. G) uses the plain sample covariance. Long-tailed classes
have a handful of images (ImageNet-LT: 5), far fewer than k (2,048 for a ResNet-50), so that covariance is
singular and Eq. 5 undefined. We shrink each class covariance towards the pooled within-class covariance, itself
Ledoit-Wolf shrunk towards a scaled identity (Ledoit & Wolf 2004, "A well-conditioned estimator for
large-dimensional covariance matrices", Lemma 3.2-3.4: intensity pi/gamma clipped to [0, 1]):

    P        = lam T + (1 - lam) S,          S = pooled within-class scatter / N, T = tr(S)/k I
    Sigma_y  = w_y P + (1 - w_y) S_y + rho I, S_y = class scatter / n_y, w_y its Ledoit-Wolf intensity towards P

so a 5-image class gets mostly the pooled shape and a 1,000-image class mostly its own; rho = 1e-9 mean(diag P)
only keeps the factorisations defined for exactly singular inputs. `shrinkage` fixes w_y for every class; with
w_y = 0 and n_y > k this is the paper's plain sample covariance (plus rho).

Memory. The Ledoit-Wolf pi term, (1/n^2) sum_i ||x_i x_i^T - S||_F^2, would need [n, k, k] outer products. With
centred x_i and S = (1/n) sum_i x_i x_i^T it has the closed form (sum_i ||x_i||^4 - n ||S||_F^2) / n^2, and
||S_y||_F = ||X_y X_y^T||_F / n_y (the n_y x n_y Gram matrix), tr(S_y P) = ||X_y V Lambda^1/2||_F^2 / n_y. The
fit streams the embeddings class by class, twice (pass 1: means, pooled scatter; pass 2: one class's factor at a
time), holding O(n_y k + k^2) numbers: at ImageNet-LT scale (k = 2,048) well under a gigabyte, never the
115,846 x 2,048 x 2,048 outer products (3.9 TB) nor the 1,000 dense k x k precisions (16.8 GB in float32).

Storage. With P = V Lambda V^T (eigendecomposition, once) and D_y = w_y Lambda + rho (diagonal),

    Sigma_y = V D_y^1/2 (I + W_y W_y^T) D_y^1/2 V^T,   W_y = sqrt((1 - w_y) / n_y) D_y^-1/2 V^T X_y^T   (k x n_y)

and the thin SVD W_y = Q_y diag(s_y) E^T gives, exactly (Woodbury; matrix determinant lemma),

    (x - mu_y)^T Sigma_y^-1 (x - mu_y) = ||z - Q_y Q_y^T z||^2 + sum_j (q_j^T z)^2 / (1 + s_j^2),
    z = D_y^-1/2 V^T (x - mu_y),     ln det Sigma_y = sum_i ln D_y,i + sum_j ln(1 + s_j^2).

Both terms are sums of squares, so no cancellation: float32 storage of Q_y costs about eps32 * s_max in relative
accuracy, where the textbook Woodbury form (||z||^2 - ||L^-1 W^T z||^2) would lose eps32 * s_max^2. The file
(safetensors, format `fgs-hardness-stats-v2`) holds V once (k x k) and per class only mu_y, Q_y (k x r_y,
r_y = min(n_y - 1, k): the rank of n_y centred samples) and s_y^2; a worker reads the header, then only the
classes its jobs ask for (seek and read per class, no mmap), keeps a few of them cached and scores in
float64. Q_y, s_y^2 and V are stored in float32; mu_y, ln det Sigma_y, w_y and Lambda in float64 (mu_y in float32
alone moved Mahalanobis scores by 1e-6 relative). ImageNet-LT at k = 2,048 is 0.97 GB on disk and 52 MiB
resident for its largest class (bench/hardness_scale.py, bench/RESULTS.md). Files of the former dense format
(`fgs-hardness-stats-v1`) are refused with a message to recompute them.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgs_common.hardness_stats_format import FORMAT, LayoutEntry, encode_header, layout, read_hardness_header
from fgs_common.hardness_stats_format import metadata as file_metadata

__all__ = ["FORMAT", "ClassStatistics", "HardnessStats"]  # FORMAT: the file format's name, for callers

# rho = RIDGE * mean(diag P): only keeps Cholesky/eigh defined for exactly singular inputs (as in v1 of this file).
RIDGE = 1e-9
# Scoring is done in float64: the embeddings come in float32 (the classifier's dtype, fgs_classifier.registry; a
# 16-bit one would be upcast here too) and one class's tensors are small.
COMPUTE_DTYPE = torch.float64
# Classes kept resident per statistics object: a job needs one class; a few cover alternating jobs of one classifier.
DEFAULT_CACHED_CLASSES = 4
# Rows per block when a stored matrix is converted to COMPUTE_DTYPE (2,048 x 256 float32: 2 MiB at a time).
_READ_ROWS = 256

_TORCH_DTYPE = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}

ClassEmbeddings = Callable[[int], torch.Tensor]
"""Class index y -> that class's embeddings [n_y, k]; called twice per class (the fit's two passes)."""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


class _SafetensorsWriter:
    """Writes a safetensors file whose tensor shapes are known up front, one tensor at a time, in any order.

    The header (8-byte little-endian length, then JSON with each tensor's dtype, shape and byte range) goes first,
    so no tensor has to be held until the end: the fit writes each class as soon as it is factored.
    """

    def __init__(self, path: Path, entries: list[LayoutEntry], metadata: dict[str, str]):
        offset = 0
        self._slots: dict[str, tuple[int, LayoutEntry]] = {}
        for entry in entries:
            self._slots[entry.name] = (offset, entry)
            offset += entry.nbytes
        head = encode_header(entries, metadata)
        self._data_start = len(head)
        self._file = open(path, "wb")
        self._file.write(head)
        self._file.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        offset, entry = self._slots[name]
        tensor = tensor.detach().to("cpu", _TORCH_DTYPE[entry.dtype]).contiguous()
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {entry.shape}")
        self._file.seek(self._data_start + offset)
        self._file.write(tensor.numpy().tobytes() if tensor.numel() else b"")
        self._written.add(name)

    def close(self) -> None:
        missing = self._slots.keys() - self._written
        self._file.close()
        if missing:
            raise RuntimeError(f"hardness statistics file left without {sorted(missing)[:5]}")

    def abort(self) -> None:
        """Close and remove a file that a failed fit left half written."""
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)


class _SafetensorsReader:
    """Reads tensors of one safetensors file, or row ranges of them, with seek and readinto.

    Not `safetensors.safe_open`: that maps the whole file into the address space, and the API's classifier check
    runs under an address-space limit (FGS_CLASSIFIER_CHECK_MEMORY_BYTES) that statistics of several GB would
    exceed. Here a read costs the bytes asked for. The header is read and checked by
    `fgs_common.hardness_stats_format.read_hardness_header`, the parser the API runs at upload: bounded, every
    tensor's dtype, shape and byte range against the v2 layout and the file.
    """

    def __init__(self, path: Path):
        self.path = path
        # Open for the reader's life, read with pread: statistics their tenant deletes stay readable to a job
        # already scoring with them (DELETE /v1/classifiers/{classifier_id} lets a running job finish).
        self._file = open(path, "rb")
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> None:
        header = read_hardness_header(self._file.fileno())
        self.metadata = header.metadata
        self.data_start = header.data_start
        self._entries = {
            name: (_TORCH_DTYPE[tensor.dtype], tensor.shape, tensor.begin) for name, tensor in header.tensors.items()
        }
        self.shapes = {name: tensor.shape for name, tensor in header.tensors.items()}

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def read(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if not shape:
            return self._read_flat(name, 0, 1).reshape(())
        return self.read_rows(name, 0, shape[0])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (the first dimension), read from disk."""
        shape = self.shapes[name]
        row = math.prod(shape[1:])
        return self._read_flat(name, start * row, stop * row).reshape(stop - start, *shape[1:])

    def _read_flat(self, name: str, first: int, last: int) -> torch.Tensor:
        dtype, _, begin = self._entries[name]
        out = torch.empty(last - first, dtype=dtype)
        if last > first:
            buffer = memoryview(out.numpy().view(np.uint8))
            offset, done = self.data_start + begin + first * _element_size(dtype), 0
            while done < len(buffer):
                read = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
                if read == 0:
                    raise ValueError(f"{self.path} is shorter than its header says")
                done += read
        return out


class _MemorySink:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().cpu()


def _fit(class_embeddings: ClassEmbeddings, counts: Sequence[int], dim: int, shrinkage: float | None, sink) -> None:
    """The two streaming passes; writes every tensor of `layout` into `sink` (a writer or a dict)."""
    num_classes, total = len(counts), int(sum(counts))
    f64 = torch.float64

    def embeddings_of(y: int) -> torch.Tensor:
        x = class_embeddings(y)
        if x.ndim != 2 or x.shape != (counts[y], dim):
            raise ValueError(f"class {y}: embeddings of shape {tuple(x.shape)}, expected ({counts[y]}, {dim})")
        return x.detach().to("cpu", f64)

    # 1. Pass 1: class means and the pooled within-class scatter, with sum_i ||x_i - mu_y||^4 for its intensity.
    means = torch.zeros(num_classes, dim, dtype=f64)
    scatter = torch.zeros(dim, dim, dtype=f64)
    fourth_moment_sum = 0.0
    for y in range(num_classes):
        if counts[y] == 0:
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
    means[~present] = (counts_tensor[present, None].to(f64) * means[present]).sum(0) / total

    # 2. The pooled covariance, Ledoit-Wolf shrunk towards tr(S)/k I; the target P = V Lambda V^T for all classes.
    pooled = scatter.div_(total)
    identity_scale = float(torch.trace(pooled)) / dim
    pooled_norm2 = float(pooled.square().sum())
    distance2 = float((pooled - identity_scale * torch.eye(dim, dtype=f64)).square().sum())
    lam = _ledoit_wolf_intensity(total, fourth_moment_sum, pooled_norm2, distance2)
    target = pooled.mul_(1 - lam)
    target.diagonal().add_(lam * identity_scale)
    ridge = RIDGE * max(float(target.diagonal().mean()), 1e-12)
    eigenvalues, eigenvectors = torch.linalg.eigh(target)
    del target, scatter, pooled
    eigenvalues = eigenvalues.clamp_min(0.0)  # P is positive semi-definite; eigh may return -1e-17
    target_norm2 = float(eigenvalues.square().sum())

    sink.put("counts", counts_tensor)
    sink.put("target_eigenvalues", eigenvalues)
    sink.put("ridge", torch.tensor(ridge, dtype=f64))
    sink.put("target_eigenvectors", eigenvectors)
    sink.put("means", means)

    # 3. Pass 2, one class at a time: its intensity w_y, the factor W_y and its thin SVD (module docstring).
    logdets = torch.empty(num_classes, dtype=f64)
    weights = torch.ones(num_classes, dtype=f64)
    for y in range(num_classes):
        n, rank = counts[y], max(min(counts[y] - 1, dim), 0)
        weight = 1.0
        rotated = None
        if n > 0:
            centered = embeddings_of(y) - means[y]
            rotated = centered @ eigenvectors  # rows V^T (x_i - mu_y)
            if shrinkage is not None:
                weight = shrinkage
            else:
                class_norm2 = _gram_norm2(centered) / n**2  # ||S_y||_F^2
                cross = float((rotated.square() * eigenvalues).sum()) / n  # tr(S_y P)
                fourth = float(centered.square().sum(1).square().sum())
                weight = _ledoit_wolf_intensity(n, fourth, class_norm2, class_norm2 - 2 * cross + target_norm2)
            del centered
        diagonal = weight * eigenvalues + ridge  # D_y
        basis = torch.zeros(dim, rank, dtype=f64)
        spectrum = torch.zeros(rank, dtype=f64)
        if rank > 0 and weight < 1.0:
            factor = (rotated * math.sqrt((1 - weight) / n) / diagonal.sqrt()).T  # W_y, k x n_y
            left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
            # Numerical rank as numpy.linalg.matrix_rank: smaller singular values are rounding noise of zero.
            keep = singular[:rank] > singular.max() * max(factor.shape) * torch.finfo(f64).eps
            kept = int(keep.sum())
            basis[:, :kept] = left[:, :kept]
            spectrum[:kept] = singular[:kept].square()
            del factor, left
        logdets[y] = diagonal.log().sum() + torch.log1p(spectrum).sum()
        weights[y] = weight
        sink.put(f"class_spectrum.{y}", spectrum)
        sink.put(f"class_basis.{y}", basis)
        del rotated
    sink.put("logdets", logdets)
    sink.put("target_weights", weights)


@dataclass
class ClassStatistics:
    """What scoring one class needs, resident on one device in COMPUTE_DTYPE (module docstring's notation)."""

    mean: torch.Tensor  # mu_y [k]
    inverse_sqrt_diagonal: torch.Tensor  # D_y^-1/2 [k]
    basis: torch.Tensor  # Q_y [k, r_y]
    damping: torch.Tensor  # 1 / (1 + s_j^2) [r_y]
    logdet: float  # ln det Sigma_y

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.mean, self.inverse_sqrt_diagonal, self.basis, self.damping))


class HardnessStats:
    """mu_y, Sigma_y^-1 and ln det Sigma_y of a classifier's embedding (Eq. 5), read class by class on demand.

    Built by `fit` (in memory) or `fit_to_file` (streamed), or opened by `load` (reads the header and the small
    per-class vectors; a class's factor is read at its first use and cached, at most `cached_classes` of them).
    """

    def __init__(
        self,
        read: Callable[[str], torch.Tensor],
        read_rows: Callable[[str, int, int], torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
        device: torch.device | str = "cpu",
        cached_classes: int = DEFAULT_CACHED_CLASSES,
    ):
        self._read, self._read_rows, self._shapes = read, read_rows, shapes
        self.device = torch.device(device)
        self.cached_classes = cached_classes
        self.counts = read("counts")
        self.logdets = read("logdets")
        self.target_weights = read("target_weights")
        self._eigenvalues = read("target_eigenvalues").to(COMPUTE_DTYPE)
        self._ridge = float(read("ridge"))
        self._eigenvectors: torch.Tensor | None = None
        self._classes: OrderedDict[int, ClassStatistics] = OrderedDict()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- fitting

    @classmethod
    def fit(
        cls, embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None = None
    ) -> HardnessStats:
        """Estimate the statistics from real-image embeddings [N, k] and labels [N], in memory.

        `shrinkage` fixes the weight w_y of the pooled covariance for every class; None picks it per class
        (Ledoit-Wolf). A class without any image gets the pooled covariance and the global mean.
        """
        counts, class_embeddings = cls._check_fit_inputs(embeddings, labels, num_classes, shrinkage)
        sink = _MemorySink()
        _fit(class_embeddings, counts, embeddings.shape[1], shrinkage, sink)
        tensors = sink.tensors
        ranks = [tensors[f"class_basis.{y}"].shape[1] for y in range(num_classes)]
        entries = layout(num_classes, embeddings.shape[1], ranks)
        for entry in entries:  # stored precision, the same as a saved and reloaded file
            tensors[entry.name] = tensors[entry.name].to(_TORCH_DTYPE[entry.dtype])
        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        return cls(tensors.__getitem__, lambda name, start, stop: tensors[name][start:stop], shapes)

    @classmethod
    def fit_to_file(
        cls,
        path: Path,
        class_embeddings: ClassEmbeddings,
        counts: Sequence[int],
        dim: int,
        shrinkage: float | None = None,
    ) -> None:
        """Fit from embeddings produced class by class and write them to `path` as they are computed.

        `class_embeddings(y)` returns class y's [counts[y], dim] embeddings and is called twice per class; memory
        stays O(max_y n_y * dim + dim^2) however many classes there are.
        """
        counts = [int(c) for c in counts]
        if sum(counts) < 2:
            raise ValueError("need at least 2 embeddings to estimate covariances")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        entries = layout(len(counts), dim, [max(min(c - 1, dim), 0) for c in counts])
        writer = _SafetensorsWriter(Path(path), entries, file_metadata(len(counts), dim))
        try:
            _fit(class_embeddings, counts, dim, shrinkage, writer)
        except BaseException:
            writer.abort()
            raise
        writer.close()

    @staticmethod
    def _check_fit_inputs(
        embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float | None
    ) -> tuple[list[int], ClassEmbeddings]:
        if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError("embeddings must be [N, k] and labels [N]")
        if embeddings.shape[0] < 2:
            raise ValueError("need at least 2 embeddings to estimate covariances")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        labels = labels.detach().long()
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes})")
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        return counts, lambda y: embeddings[order[starts[y] : starts[y + 1]]]

    # ---------------------------------------------------------------- files

    def save(self, path: Path) -> None:
        """Write the statistics as one safetensors file (format `fgs-hardness-stats-v2`), class by class."""
        ranks = [self._shapes[f"class_basis.{y}"][1] for y in range(self.num_classes)]
        entries = layout(self.num_classes, self.dim, ranks)
        writer = _SafetensorsWriter(Path(path), entries, file_metadata(self.num_classes, self.dim))
        try:
            for entry in entries:
                writer.put(entry.name, self._read(entry.name))
        finally:
            writer.close()

    @classmethod
    def load(
        cls, path: Path, device: torch.device | str = "cpu", cached_classes: int = DEFAULT_CACHED_CLASSES
    ) -> HardnessStats:
        """Open statistics written by `save`/`fit_to_file` (safetensors: no pickle); reads no class factor yet.

        Raises InvalidHardnessStats (a ValueError) when the file is not v2 statistics or a tensor does not fit.
        """
        source = _SafetensorsReader(Path(path))
        read, read_rows, shapes = source.read, source.read_rows, source.shapes
        return cls(read, read_rows, shapes, device=device, cached_classes=cached_classes)

    def to(self, device: torch.device | str) -> HardnessStats:
        """The same statistics, scored on `device` (class factors move there at first use)."""
        return HardnessStats(self._read, self._read_rows, self._shapes, device, self.cached_classes)

    # ---------------------------------------------------------------- reading

    @property
    def num_classes(self) -> int:
        return self._shapes["means"][0]

    @property
    def dim(self) -> int:
        return self._shapes["means"][1]

    @property
    def means(self) -> torch.Tensor:
        """All class means [K, k] (reads them all: K * k * 4 bytes)."""
        return self._read("means").float()

    def class_statistics(self, y: int) -> ClassStatistics:
        """Class y's resident statistics on `self.device`, read from the file at first use (LRU cached)."""
        with self._lock:
            if y in self._classes:
                self._classes.move_to_end(y)
                return self._classes[y]
        if not 0 <= y < self.num_classes:
            raise ValueError(f"class {y} is outside the statistics' {self.num_classes} classes")
        weight = float(self.target_weights[y])
        spectrum = self._read(f"class_spectrum.{y}").to(self.device, COMPUTE_DTYPE)
        basis = self._read_converted(f"class_basis.{y}")  # before V (below): the peak holds one float32 copy less
        loaded = ClassStatistics(
            mean=self._read_rows("means", y, y + 1)[0].to(self.device, COMPUTE_DTYPE),
            inverse_sqrt_diagonal=(weight * self._eigenvalues + self._ridge).rsqrt().to(self.device),
            basis=basis,
            damping=1.0 / (1.0 + spectrum),
            logdet=float(self.logdets[y]),
        )
        with self._lock:
            self._classes[y] = loaded
            while len(self._classes) > self.cached_classes:
                self._classes.popitem(last=False)
        return loaded

    def _target_eigenvectors(self) -> torch.Tensor:
        """V [k, k], shared by every class; read once."""
        with self._lock:
            if self._eigenvectors is None:
                self._eigenvectors = self._read_converted("target_eigenvectors")
            return self._eigenvectors

    def _read_converted(self, name: str) -> torch.Tensor:
        """A stored float32 matrix in COMPUTE_DTYPE on `self.device`, read in row blocks: never a second whole copy."""
        rows = self._shapes[name][0]
        out = torch.empty(self._shapes[name], dtype=COMPUTE_DTYPE, device=self.device)
        for start in range(0, rows, _READ_ROWS):
            out[start : start + _READ_ROWS] = self._read_rows(name, start, min(start + _READ_ROWS, rows))
        return out

    def resident_bytes(self) -> int:
        """Bytes of tensors held for scoring: V, the cached classes and the per-class vectors."""
        shared = sum(_nbytes(t) for t in (self.counts, self.logdets, self.target_weights, self._eigenvalues))
        if self._eigenvectors is not None:
            shared += _nbytes(self._eigenvectors)
        return shared + sum(c.nbytes for c in self._classes.values())

    # ---------------------------------------------------------------- scoring

    def mahalanobis(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(e - mu_y)^T Sigma_y^-1 (e - mu_y) for each row of `embedding` [B, k] (differentiable), in its dtype.

        Module docstring: ||z - Q Q^T z||^2 + sum_j (q_j^T z)^2 / (1 + s_j^2) with z = D_y^-1/2 V^T (e - mu_y).
        """
        if embedding.ndim != 2 or embedding.shape[1] != self.dim:
            raise ValueError(f"embedding must be [batch, {self.dim}], got {tuple(embedding.shape)}")
        values = torch.empty(embedding.shape[0], dtype=COMPUTE_DTYPE, device=embedding.device)
        parts = []
        for y in torch.unique(labels).tolist():
            rows = (labels == y).nonzero().squeeze(1)
            stats = self.class_statistics(int(y))
            eigenvectors = self._target_eigenvectors().to(embedding.device)  # after the class: a lower first peak
            mean, inverse_sqrt, basis, damping = (
                t.to(embedding.device) for t in (stats.mean, stats.inverse_sqrt_diagonal, stats.basis, stats.damping)
            )
            z = ((embedding[rows].to(COMPUTE_DTYPE) - mean) @ eigenvectors) * inverse_sqrt
            projected = z @ basis  # Q^T z
            residual = z - projected @ basis.T
            parts.append((rows, residual.square().sum(1) + (projected.square() * damping).sum(1)))
        for rows, part in parts:
            values = values.index_put((rows,), part)
        return values.to(embedding.dtype)

    def class_logdets(self, labels: torch.Tensor) -> torch.Tensor:
        """ln det Sigma_y for each label, on the labels' device (float64)."""
        return self.logdets.to(labels.device)[labels]

    def score(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 5: 1/2 [(e - mu_y)^T Sigma_y^-1 (e - mu_y) + ln det Sigma_y + k ln 2 pi], in the embedding's dtype."""
        mahalanobis = self.mahalanobis(embedding, labels).to(COMPUTE_DTYPE)
        value = 0.5 * (mahalanobis + self.class_logdets(labels) + self.dim * math.log(2 * math.pi))
        return value.to(embedding.dtype)

    @property
    def precisions(self) -> torch.Tensor:
        """Dense Sigma_y^-1 [K, k, k] (float32), for inspection at small k; refuses past 1 GiB.

        Sigma_y^-1 = V D_y^-1/2 (I - Q_y diag(s^2 / (1 + s^2)) Q_y^T) D_y^-1/2 V^T.
        """
        nbytes = self.num_classes * self.dim**2 * 4
        if nbytes > 1 << 30:
            raise ValueError(f"dense precisions would take {nbytes / 1e9:.1f} GB; score with mahalanobis() instead")
        eigenvectors = self._read("target_eigenvectors").to(COMPUTE_DTYPE)
        out = torch.empty(self.num_classes, self.dim, self.dim)
        for y in range(self.num_classes):
            basis = self._read(f"class_basis.{y}").to(COMPUTE_DTYPE)
            spectrum = self._read(f"class_spectrum.{y}").to(COMPUTE_DTYPE)
            whitened = torch.eye(self.dim, dtype=COMPUTE_DTYPE) - (basis * (spectrum / (1 + spectrum))) @ basis.T
            scale = eigenvectors * (float(self.target_weights[y]) * self._eigenvalues + self._ridge).rsqrt()
            out[y] = (scale @ whitened @ scale.T).float()
        return out
