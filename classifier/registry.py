"""The team's classifiers, loaded from safe archives and kept resident in an LRU.

A classifier is a TorchScript or torch.export archive plus a ClassifierSpec (input size, normalisation,
class count, whether forward also returns the embedding used by the hardness score). Loading never
unpickles Python objects: torch.jit.load and torch.export.load read their own formats only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fgs_common.classifier_archive import ArchiveFormat, NotAClassifierArchive, detect_archive_format
from fgs_common.exceptions import InvalidClassifier
from fgs_common.wire import ClassifierOutput, ClassifierSpec
from fgs_classifier.hardness_stats import HardnessStats


@dataclass
class LoadedClassifier:
    """A resident classifier f_phi with its input preprocessing: pixels in [0, 1] -> (logits, embedding)."""

    module: torch.nn.Module
    spec: ClassifierSpec
    hardness_stats: HardnessStats | None
    device: torch.device
    dtype: torch.dtype

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

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = self.module(self.preprocess(pixels.to(self.dtype)))
        if self.spec.output is ClassifierOutput.logits_embedding:
            logits, embedding = output
            return logits, embedding
        return output, None


def _load_module(path: Path, device: torch.device) -> torch.nn.Module:
    try:
        archive_format = detect_archive_format(path)
    except NotAClassifierArchive as error:
        raise InvalidClassifier(str(error)) from error
    try:
        if archive_format is ArchiveFormat.torchscript:
            module = torch.jit.load(str(path), map_location=device)
        else:
            module = torch.export.load(str(path)).module().to(device)
    except Exception as error:  # a damaged archive surfaces as any of torch's internal errors
        raise InvalidClassifier(f"classifier archive could not be loaded as {archive_format.value}: {error}") from error
    return module


def _check_against_spec(classifier: LoadedClassifier) -> None:
    """Run a batch of 2 through the classifier and compare its outputs to the spec."""
    spec = classifier.spec
    probe = torch.rand(2, 3, spec.input_size, spec.input_size, device=classifier.device)
    try:
        with torch.no_grad():
            output = classifier.module(classifier.preprocess(probe.to(classifier.dtype)))
    except Exception as error:
        raise InvalidClassifier(
            f"classifier does not run on a batch of 2 images of {spec.in_channels}x{spec.input_size}x{spec.input_size} "
            f"(input_size/in_channels in the spec, or a static batch size in the export): {error}"
        ) from error
    if spec.output is ClassifierOutput.logits_embedding:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise InvalidClassifier("spec says output 'logits_embedding' but forward does not return (logits, embedding)")
        logits, embedding = output
        if embedding.ndim != 2 or embedding.shape[0] != 2:
            raise InvalidClassifier(f"embedding must be [batch, k], got {tuple(embedding.shape)}")
    else:
        logits = output
        if not isinstance(logits, torch.Tensor):
            raise InvalidClassifier("spec says output 'logits' but forward does not return one tensor")
    if logits.ndim != 2 or logits.shape != (2, spec.num_classes):
        raise InvalidClassifier(
            f"classifier returns logits of shape {tuple(logits.shape)} for 2 images; the spec's num_classes={spec.num_classes}"
        )
    stats = classifier.hardness_stats
    if stats is not None:
        if stats.num_classes != spec.num_classes:
            raise InvalidClassifier(f"hardness statistics have {stats.num_classes} classes; the spec has {spec.num_classes}")
        if spec.output is not ClassifierOutput.logits_embedding:
            raise InvalidClassifier("hardness statistics need a classifier whose spec output is 'logits_embedding'")
        if embedding.shape[1] != stats.dim:
            raise InvalidClassifier(f"hardness statistics are {stats.dim}-dimensional; the embedding is {embedding.shape[1]}")


def load_classifier(
    archive_path: Path,
    spec: ClassifierSpec,
    hardness_stats_path: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedClassifier:
    """Load and check a classifier; fp16 on CUDA, fp32 elsewhere unless `dtype` says otherwise."""
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    module = _load_module(Path(archive_path), device)
    module = module.to(dtype) if hasattr(module, "to") else module
    if hasattr(module, "eval"):
        module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    stats = None
    if hardness_stats_path is not None:
        try:
            stats = HardnessStats.load(Path(hardness_stats_path)).to(device)
        except Exception as error:
            raise InvalidClassifier(f"hardness statistics are not a valid safetensors file: {error}") from error
    classifier = LoadedClassifier(module=module, spec=spec, hardness_stats=stats, device=device, dtype=dtype)
    _check_against_spec(classifier)
    return classifier


class ClassifierRegistry:
    """LRU of resident classifiers keyed by (tenant, classifier id), with hit/miss/eviction counters."""

    def __init__(self, capacity: int, on_event: Callable[[str], None] | None = None):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, LoadedClassifier] = OrderedDict()
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda event: None)

    def get(self, key: str, load: Callable[[], LoadedClassifier]) -> LoadedClassifier:
        """The resident classifier for `key`, loading it with `load()` on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self._on_event("hit")
                return self._items[key]
        classifier = load()
        with self._lock:
            self._on_event("miss")
            self._items[key] = classifier
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self._on_event("eviction")
        return classifier

    def __len__(self) -> int:
        return len(self._items)
