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

The fit (`fgs_classifier.hardness_stats_fit`) streams the embeddings class by class, twice, in O(n_y k + k^2)
memory.

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
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgs_classifier.hardness_stats_fit import ClassEmbeddings, check_fit_arguments, embeddings_by_class, fit_statistics
from fgs_common.hardness_stats_format import FORMAT, HardnessStatsFile, HardnessStatsWriter, layout
from fgs_common.hardness_stats_format import metadata as file_metadata

__all__ = ["FORMAT", "ClassStatistics", "HardnessStats"]  # FORMAT: the file format's name, for callers

# Scoring is done in float64: the embeddings come in float32 (the classifier's dtype, fgs_classifier.registry; a
# 16-bit one would be upcast here too) and one class's tensors are small.
COMPUTE_DTYPE = torch.float64
# Classes kept resident per statistics object: a job needs one class; a few cover alternating jobs of one classifier.
DEFAULT_CACHED_CLASSES = 4
# Rows per block when a stored matrix is converted to COMPUTE_DTYPE (2,048 x 256 float32: 2 MiB at a time).
_READ_ROWS = 256

_TORCH_DTYPE = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_tensor(writer: HardnessStatsWriter, name: str, tensor: torch.Tensor) -> None:
    """`tensor` in the dtype and shape the file's layout gives `name`, written through the one writer."""
    entry = writer.entries[name]
    tensor = tensor.detach().to("cpu", _TORCH_DTYPE[entry.dtype]).contiguous()
    if tuple(tensor.shape) != entry.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {entry.shape}")
    writer.put(name, tensor.numpy().tobytes() if tensor.numel() else b"")


class _TensorReader:
    """Tensors, or row ranges of them, of one v2 file read through `HardnessStatsFile` (pread: a read costs the
    bytes asked for, never a map of the whole file)."""

    def __init__(self, path: Path):
        self._file = HardnessStatsFile(path)
        self.shapes = {name: tensor.shape for name, tensor in self._file.header.tensors.items()}

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
        out = torch.empty(last - first, dtype=_TORCH_DTYPE[self._file.header.tensors[name].dtype])
        if last > first:
            self._file.read_into(name, first * out.element_size(), memoryview(out.numpy().view(np.uint8)))
        return out


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
        counts, class_embeddings = embeddings_by_class(embeddings, labels, num_classes, shrinkage)
        tensors: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            tensors[name] = tensor.detach().cpu()

        fit_statistics(class_embeddings, counts, embeddings.shape[1], shrinkage, keep)
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
        check_fit_arguments(sum(counts), shrinkage)
        entries = layout(len(counts), dim, [max(min(c - 1, dim), 0) for c in counts])
        writer = HardnessStatsWriter(Path(path), entries, file_metadata(len(counts), dim))
        try:
            fit_statistics(class_embeddings, counts, dim, shrinkage, lambda name, t: _write_tensor(writer, name, t))
        except BaseException:
            writer.abort()
            raise
        writer.close()

    # ---------------------------------------------------------------- files

    def save(self, path: Path) -> None:
        """Write the statistics as one safetensors file (format `fgs-hardness-stats-v2`), class by class."""
        ranks = [self._shapes[f"class_basis.{y}"][1] for y in range(self.num_classes)]
        entries = layout(self.num_classes, self.dim, ranks)
        writer = HardnessStatsWriter(Path(path), entries, file_metadata(self.num_classes, self.dim))
        try:
            for entry in entries:
                _write_tensor(writer, entry.name, self._read(entry.name))
        finally:
            writer.close()

    @classmethod
    def load(
        cls, path: Path, device: torch.device | str = "cpu", cached_classes: int = DEFAULT_CACHED_CLASSES
    ) -> HardnessStats:
        """Open statistics written by `save`/`fit_to_file` (safetensors: no pickle); reads no class factor yet.

        Raises InvalidHardnessStats when the file is not v2 statistics or a tensor does not fit.
        """
        source = _TensorReader(Path(path))
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
