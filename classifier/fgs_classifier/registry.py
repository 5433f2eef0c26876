"""The team's classifiers, loaded from safe archives and kept resident in an LRU.

A classifier is a TorchScript or torch.export archive plus a ClassifierSpec (input size, normalisation,
class count, whether forward also returns the embedding used by the hardness score). Loading never
unpickles Python objects: the archive is vetted first (`fgs_common.classifier_archive`: no pickled weights, no
file operators, no code in shape expressions), a `.pt2` is read without its sample inputs (the one pickle
torch.export.load would otherwise read), and the loaded graphs are checked against the operator allow-list
(`fgs_classifier.graph_check`) before anything runs.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F

from fgs_classifier.graph_check import check_exported_program, check_script_module
from fgs_classifier.hardness_stats import HardnessStats
from fgs_common.classifier_archive import DEFAULT_MAX_UNPACKED_BYTES, ArchiveFormat, inspect_archive
from fgs_common.exceptions import (
    ArchiveTooLarge,
    InvalidClassifier,
    NotAClassifierArchive,
    UnsafeClassifier,
    UnsafeClassifierArchive,
)
from fgs_common.wire import ClassifierOutput, ClassifierSpec

Resident = TypeVar("Resident")


@dataclass
class LoadedClassifier:
    """A resident classifier f_phi with its input preprocessing: pixels in [0, 1] -> (logits, embedding).

    `batch_size` is set for an export with a static batch dimension: inputs then go through in chunks of
    exactly that size (the last one zero-padded), since the exported graph accepts no other.
    """

    module: torch.nn.Module
    spec: ClassifierSpec
    hardness_stats: HardnessStats | None
    device: torch.device
    dtype: torch.dtype
    batch_size: int | None = None

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the classifier's input: resized, channel-matched, normalised."""
        size = self.spec.input_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.spec.in_channels == 1:
            pixels = pixels.mean(dim=1, keepdim=True)
        mean = torch.tensor(self.spec.mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def forward_module(self, inputs: torch.Tensor):
        """The module's output for preprocessed `inputs`, in chunks of `batch_size` when the export fixes it."""
        size = self.batch_size
        if size is None or inputs.shape[0] == size:
            return self.module(inputs)
        outputs = []
        for chunk in inputs.split(size):
            count = chunk.shape[0]
            if count < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))])
            output = self.module(chunk)
            outputs.append(tuple(o[:count] for o in output) if isinstance(output, (tuple, list)) else output[:count])
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs, strict=False))
        return torch.cat(outputs)

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Pixels from a 16-bit decode are cast here, at the boundary, to the classifier's own dtype (float32 by
        # default, see load_classifier); the gradient flows back through the cast.
        return self.outputs(self.preprocess(pixels.to(self.dtype)))

    def outputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, embedding or None) of inputs already through `preprocess`."""
        output = self.forward_module(inputs)
        if self.spec.output is ClassifierOutput.logits_embedding:
            logits, embedding = output
            return logits, embedding
        return output, None


def _export_archive_without_sample_inputs(path: Path) -> io.BytesIO:
    """A copy of a vetted `.pt2` whose sample inputs are empty: torch.export.load reads them with torch.load and
    falls back to weights_only=False when that fails; with no bytes it reads nothing (and they are not needed)."""
    copy = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
        for info in source.infolist():
            is_sample_inputs = info.filename.split("/", 1)[1].startswith("data/sample_inputs/")
            target.writestr(info, b"" if is_sample_inputs else source.read(info))
    copy.seek(0)
    return copy


def _static_batch_size(program: torch.export.ExportedProgram) -> int | None:
    """The export's fixed batch size, or None when its batch dimension is dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if len(placeholders) != 1:
        raise InvalidClassifier(f"exported classifier takes {len(placeholders)} inputs; it must take one image batch")
    shape = getattr(placeholders[0].meta.get("val"), "shape", None)
    if shape is None or len(shape) != 4:
        raise InvalidClassifier("exported classifier's input is not a 4-D image batch [B, C, H, W]")
    return int(shape[0]) if isinstance(shape[0], int) else None


def _load_module(path: Path, device: torch.device, max_unpacked_bytes: int) -> tuple[torch.nn.Module, int | None]:
    """The vetted, loaded and graph-checked module, and its static batch size (exports only)."""
    try:
        archive_format = inspect_archive(path, max_unpacked_bytes)
    except (UnsafeClassifierArchive, ArchiveTooLarge) as error:
        raise UnsafeClassifier(str(error)) from error
    except NotAClassifierArchive as error:
        raise InvalidClassifier(str(error)) from error
    try:
        if archive_format is ArchiveFormat.torchscript:
            module = torch.jit.load(str(path), map_location=device)
        else:
            program = torch.export.load(_export_archive_without_sample_inputs(path))
    except Exception as error:  # a damaged archive surfaces as any of torch's internal errors
        raise InvalidClassifier(
            f"classifier archive could not be loaded as {archive_format.value}: {_short(error)}"
        ) from error
    try:
        if archive_format is ArchiveFormat.torchscript:
            check_script_module(module)
            return module, None
        check_exported_program(program)
    except UnsafeClassifierArchive as error:
        raise UnsafeClassifier(str(error)) from error
    batch_size = _static_batch_size(program)
    return program.module().to(device), batch_size


def _short(error: BaseException) -> str:
    """One line of at most 300 characters of torch's own error text (it can hold the archive's strings)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_against_spec(classifier: LoadedClassifier) -> None:
    """Run a batch of 2 through the classifier and compare its outputs to the spec."""
    spec = classifier.spec
    probe = torch.rand(2, 3, spec.input_size, spec.input_size, device=classifier.device)
    try:
        with torch.no_grad():
            output = classifier.forward_module(classifier.preprocess(probe.to(classifier.dtype)))
    except Exception as error:
        raise InvalidClassifier(
            f"classifier does not run on a batch of 2 images of {spec.in_channels}x{spec.input_size}x{spec.input_size} "
            f"(input_size/in_channels in the spec): {_short(error)}"
        ) from error
    if spec.output is ClassifierOutput.logits_embedding:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise InvalidClassifier(
                "spec says output 'logits_embedding' but forward does not return (logits, embedding)"
            )
        logits, embedding = output
        if embedding.ndim != 2 or embedding.shape[0] != 2:
            raise InvalidClassifier(f"embedding must be [batch, k], got {tuple(embedding.shape)}")
    else:
        logits = output
        if not isinstance(logits, torch.Tensor):
            raise InvalidClassifier("spec says output 'logits' but forward does not return one tensor")
    if logits.ndim != 2 or logits.shape != (2, spec.num_classes):
        raise InvalidClassifier(
            f"classifier returns logits of shape {tuple(logits.shape)} for 2 images; the spec's "
            f"num_classes={spec.num_classes}"
        )
    stats = classifier.hardness_stats
    if stats is not None:
        if stats.num_classes != spec.num_classes:
            raise InvalidClassifier(
                f"hardness statistics have {stats.num_classes} classes; the spec has {spec.num_classes}"
            )
        if spec.output is not ClassifierOutput.logits_embedding:
            raise InvalidClassifier("hardness statistics need a classifier whose spec output is 'logits_embedding'")
        if embedding.shape[1] != stats.dim:
            raise InvalidClassifier(
                f"hardness statistics are {stats.dim}-dimensional; the embedding is {embedding.shape[1]}"
            )


def _close(item: object) -> None:
    close = getattr(item, "close", None)
    if close is not None:
        close()


def load_classifier(
    archive_path: Path,
    spec: ClassifierSpec,
    hardness_stats_path: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
) -> LoadedClassifier:
    """Load and check a classifier, in float32 on any device unless `dtype` says otherwise.

    float32 whatever the diffusion model's dtype (FGS_DTYPE): archives are exported in float32 and the upload
    check ran them in float32; a `.pt2` whose graph holds a float32 constant fails once its weights are cast to
    16 bits ("Input type (float) and bias type (c10::BFloat16) should be the same", measured with torch 2.13);
    and the classifier is small next to the UNet and VAE it follows. Its input is cast in `LoadedClassifier`.
    """
    device = torch.device(device)
    dtype = dtype or torch.float32
    module, batch_size = _load_module(Path(archive_path), device, max_unpacked_bytes)
    module = module.to(dtype)
    if isinstance(module, torch.jit.ScriptModule):
        module.eval()  # an exported module has no eval(): export already fixed its mode
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    stats = None
    if hardness_stats_path is not None:
        try:
            stats = HardnessStats.load(Path(hardness_stats_path), device=device)
        except Exception as error:  # safetensors reports a damaged file as its own SafetensorError
            raise InvalidClassifier(f"hardness statistics cannot be read: {error}") from error
    classifier = LoadedClassifier(
        module=module, spec=spec, hardness_stats=stats, device=device, dtype=dtype, batch_size=batch_size
    )
    _check_against_spec(classifier)
    return classifier


class ClassifierRegistry(Generic[Resident]):
    """LRU of resident classifiers keyed by (tenant, classifier id), with hit/miss/eviction counters. A worker
    keeps its confined classifiers here (fgs_worker.confined_classifier): an evicted one is closed (its process
    ended)."""

    def __init__(self, capacity: int, on_event: Callable[[str], None] | None = None):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, Resident] = OrderedDict()
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda event: None)

    def get(self, key: str, load: Callable[[], Resident]) -> Resident:
        """The resident classifier for `key`, loading it with `load()` on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._on_event("hit")
                return self._items[key]
        classifier = load()
        with self._lock:
            self._on_event("miss")
            evicted = [self._items[key]] if key in self._items else []  # loaded twice meanwhile: the older goes
            self._items[key] = classifier
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False)[1])
                self._on_event("eviction")
        for item in evicted:
            _close(item)
        return classifier

    def close(self) -> None:
        """Close every resident classifier (the worker's end)."""
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
        for item in items:
            _close(item)

    def __len__(self) -> int:
        return len(self._items)
