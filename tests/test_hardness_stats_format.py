"""The one parser of hardness statistics headers (fgs_common.hardness_stats_format), without torch: bounded in size
and nesting, and every tensor checked against the v2 layout and the file, so the API refuses at upload what a
worker would fail on (tests/test_service_hardness_upload.py sends the same files through a real API)."""

from __future__ import annotations

import csv
import json
import os
import struct
import time
from pathlib import Path

import pytest

from fgs_client.dataset_readers import packaged_path
from fgs_common.exceptions import InvalidHardnessStats
from fgs_common.hardness_stats_format import (
    MAX_HEADER_BYTES,
    LayoutEntry,
    encode_header,
    layout,
    metadata,
    read_hardness_header,
)


def write_file(path: Path, entries: list[LayoutEntry], meta: dict[str, str] | None = None, extra: int = 0) -> Path:
    """A file whose header places `entries` one after another, its data zeros (sparse), `extra` bytes past them."""
    head = encode_header(entries, meta if meta is not None else metadata(*_classes_and_dim(entries)))
    with open(path, "wb") as file:
        file.write(head)
        file.truncate(len(head) + sum(e.nbytes for e in entries) + extra)
    return path


def _classes_and_dim(entries: list[LayoutEntry]) -> tuple[int, int]:
    means = next(e for e in entries if e.name == "means")
    return means.shape[0], means.shape[1]


def write_raw(path: Path, header: bytes, data: int = 0) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data))
    return path


def read(path: Path):
    with open(path, "rb") as file:
        return read_hardness_header(file.fileno())


def small_layout() -> list[LayoutEntry]:
    return layout(3, 4, [2, 0, 4])


def replaced(entries: list[LayoutEntry], name: str, **changes) -> list[LayoutEntry]:
    return [LayoutEntry(**{**e.__dict__, **changes}) if e.name == name else e for e in entries]


def test_a_valid_file_is_read_with_its_layout(tmp_path):
    header = read(write_file(tmp_path / "ok.safetensors", small_layout()))
    assert (header.num_classes, header.dim) == (3, 4)
    assert header.tensors["class_basis.2"].shape == (4, 4) and header.tensors["class_basis.2"].dtype == "F32"
    assert header.data_start % 8 == 0


def test_imagenet_lt_at_k_2048_fits_the_header_cap_with_room():
    """The cap's provenance (module docstring): ImageNet-LT's 1,000 classes at k = 2,048, ranks min(n_y - 1, k)."""
    with open(packaged_path("imagenet_lt_train_counts.csv"), newline="") as handle:
        counts = [int(row["train_count"]) for row in csv.DictReader(handle)]
    entries = layout(len(counts), 2048, [min(c - 1, 2048) for c in counts])
    size = len(encode_header(entries, metadata(len(counts), 2048)))
    assert 150_000 < size < 200_000, size  # 0.17 MB
    assert MAX_HEADER_BYTES >= 20 * size


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (replaced(small_layout(), "class_basis.2", dtype="F64"), "class_basis.2 is F64 [4, 4], expected F32 [4, 4]"),
        (replaced(small_layout(), "class_basis.0", shape=(-4, -2)), "not a list of non-negative integers"),
        (replaced(small_layout(), "class_spectrum.1", shape=(3,)), "class_spectrum.1 is F32 [3], expected F32 [0]"),
        (replaced(small_layout(), "class_basis.2", shape=(4, 5)), "class 2's basis is [4, 5], expected [4, r]"),
        (small_layout()[:-1], "holds 12 tensors; 3 classes need 13"),
    ],
    ids=["wrong-dtype", "negative-dims", "wrong-rank", "rank-above-k", "class-missing"],
)
def test_tensors_that_do_not_fit_the_layout_are_refused(tmp_path, entries, message):
    with pytest.raises(InvalidHardnessStats, match=_literal(message)):
        read(write_file(tmp_path / "bad.safetensors", entries))


def _literal(text: str) -> str:
    return "".join("\\" + c if c in "[]().*+?{}|^$\\" else c for c in text)


def _header_with(tmp_path: Path, change) -> Path:
    """A valid header, changed by `change(dict)`, re-encoded, over the valid data length."""
    entries = small_layout()
    raw = encode_header(entries, metadata(3, 4))[8:]
    header = json.loads(raw)
    change(header)
    return write_raw(tmp_path / "changed.safetensors", json.dumps(header).encode(), sum(e.nbytes for e in entries))


def test_byte_ranges_are_checked_against_the_shape_each_other_and_the_file(tmp_path):
    def past_the_end(header):
        begin, end = header["class_basis.2"]["data_offsets"]
        header["class_basis.2"]["data_offsets"] = [begin + 8, end + 8]

    def overlapping(header):
        header["class_basis.2"]["data_offsets"] = header["class_basis.0"]["data_offsets"][:1] + [
            header["class_basis.0"]["data_offsets"][0] + 64
        ]

    def wrong_length(header):
        header["class_basis.0"]["data_offsets"][1] += 4

    def negative(header):
        header["class_basis.0"]["data_offsets"] = [-32, 0]

    cases = {
        "past the end": (past_the_end, "starts at byte"),
        "overlapping": (overlapping, "starts at byte"),
        "wrong length": (wrong_length, "does not fit its shape"),
        "negative": (negative, "not a list of non-negative integers"),
        "unknown dtype": (lambda h: h["class_basis.0"].update(dtype="BF16"), "dtype 'BF16' is not one of"),
        "metadata": (lambda h: h["__metadata__"].update(num_classes="7"), "metadata says 7 classes"),
        "format": (lambda h: h["__metadata__"].update(format="fgs-hardness-stats-v1"), "fgs-client hardness-stats"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(InvalidHardnessStats, match=_literal(message)):
            read(_header_with(tmp_path, change))
        print(name, "refused")
    entries = small_layout()
    with pytest.raises(InvalidHardnessStats, match="the file holds"):
        read(write_file(tmp_path / "trailing.safetensors", entries, extra=8))


def test_a_header_past_the_cap_is_refused_by_its_length_alone(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as file:  # the 99 MB of `[{},{},...]` of the finding: sparse, never read
        file.write(struct.pack("<Q", 99_000_000) + b"[{}")
        file.truncate(8 + 99_000_000)
    with pytest.raises(InvalidHardnessStats, match=f"99000000 bytes, more than the {MAX_HEADER_BYTES}"):
        read(path)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 50_000 + b"]" * 50_000,  # the finding: json.loads raised RecursionError (a 500)
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"[" + b"{}," * (MAX_HEADER_BYTES // 3 - 1) + b"{}]",  # as many objects as the cap holds
        b'{"__metadata__":{"format":{"x":[]}}}',
        b'{"t":{"shape":[[1]]}}',
        b'{"t":{"dtype":"F32"]}',
    ],
    ids=["deep-lists", "deep-objects", "object-flood", "nested-metadata", "nested-shape", "mismatched"],
)
def test_nesting_other_than_a_safetensors_header_is_refused_before_parsing(tmp_path, header):
    path = write_raw(tmp_path / "nested.safetensors", header)
    started = time.perf_counter()
    with pytest.raises(InvalidHardnessStats, match="nests deeper than a safetensors header"):
        read(path)
    assert time.perf_counter() - started < 5  # a few ms; loose for a loaded machine: only "not quadratic"


def test_brackets_inside_names_are_text_not_nesting(tmp_path):
    """The skeleton check removes strings first: a name with brackets and escaped quotes is no nesting."""
    entries = small_layout()
    meta = {**metadata(3, 4), "note": 'fitted on [a "b"] {c}\\'}
    header = read(write_file(tmp_path / "named.safetensors", entries, meta))
    assert header.metadata["note"] == 'fitted on [a "b"] {c}\\'
    assert os.path.getsize(tmp_path / "named.safetensors") == header.data_start + sum(e.nbytes for e in entries)
