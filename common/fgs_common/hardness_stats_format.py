"""The hardness statistics file (safetensors, format `fgs-hardness-stats-v2`): its layout, its one header parser,
and the one reader and writer of its tensors' bytes (`HardnessStatsFile`, `HardnessStatsWriter`; torch-free: the
conversion to tensors is `fgs_classifier.hardness_stats`'s).

Both the API (at upload, without torch) and `fgs_classifier.hardness_stats` (the worker, when it scores) read a
file's header here, so a file the worker would refuse is refused at upload: the same layout, dtypes, shapes and
byte ranges, checked against the file's size.

The parse is bounded before `json.loads` sees anything:
- the header is at most `MAX_HEADER_BYTES`. A v2 header of 1,000 classes at k = 2,048 (ImageNet-LT with a
  ResNet-50 embedding) is 0.17 MB (`tests/test_hardness_stats.py` measures it); 4 MiB leaves 24x room (about
  24,000 such classes) and bounds what parsing may allocate (a few tens of MB for the worst-shaped 4 MiB);
- its bracket skeleton (the header with its strings removed, brackets only) must be that of a safetensors
  header: one object of objects whose values are flat lists (`{"name": {"shape": [..], "data_offsets": [..]}}`,
  `"__metadata__"` an object of strings). The check removes the innermost pairs a fixed number of times (no
  recursion, no stack), so 50,000 nested `[` are refused without a RecursionError and a `[{},{},...]` flood
  without building millions of objects.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from fgs_common.exceptions import InvalidHardnessStats

FORMAT = "fgs-hardness-stats-v2"
MAX_HEADER_BYTES = 4 * 1024 * 1024
# The dtypes a v2 file uses and their sizes (safetensors' names).
ELEMENT_BYTES = {"F32": 4, "F64": 8, "I64": 8}

# A JSON string (escapes included); stripped before the skeleton check so that brackets in names do not count.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNER_LIST = re.compile(rb"\[\]")
_INNER_OBJECT = re.compile(rb"\{\}")


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of a v2 file: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_BYTES[self.dtype]


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a header places it: dtype, shape and byte range [begin, end) after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class HardnessHeader:
    """A checked v2 header: every tensor fits the layout for (num_classes, dim) and lies inside the file."""

    metadata: dict[str, str]
    data_start: int
    tensors: dict[str, StoredTensor]
    num_classes: int
    dim: int


def layout(num_classes: int, dim: int, ranks: list[int]) -> list[LayoutEntry]:
    """Every tensor of a v2 file. 8-byte types first, so that every tensor starts aligned to its element size."""
    entries = [
        LayoutEntry("counts", "I64", (num_classes,)),
        LayoutEntry("logdets", "F64", (num_classes,)),
        LayoutEntry("target_weights", "F64", (num_classes,)),
        LayoutEntry("target_eigenvalues", "F64", (dim,)),
        LayoutEntry("ridge", "F64", ()),
        LayoutEntry("target_eigenvectors", "F32", (dim, dim)),
        LayoutEntry("means", "F64", (num_classes, dim)),
    ]
    for y, rank in enumerate(ranks):
        entries.append(LayoutEntry(f"class_spectrum.{y}", "F32", (rank,)))
        entries.append(LayoutEntry(f"class_basis.{y}", "F32", (dim, rank)))
    return entries


def metadata(num_classes: int, dim: int) -> dict[str, str]:
    return {"format": FORMAT, "num_classes": str(num_classes), "dim": str(dim)}


def _placements(entries: list[LayoutEntry]) -> dict[str, tuple[int, int]]:
    """Each entry's byte range [begin, end) in the data, one after another from byte 0 in the order given."""
    placed, offset = {}, 0
    for entry in entries:
        placed[entry.name] = (offset, offset + entry.nbytes)
        offset += entry.nbytes
    return placed


def encode_header(entries: list[LayoutEntry], meta: dict[str, str]) -> bytes:
    """A file's first bytes: the header's 8-byte little-endian length, then its JSON placing `entries` one after
    another from byte 0 of the data, padded so that the data starts 8-byte aligned (as safetensors' writer does)."""
    header: dict[str, object] = {"__metadata__": meta}
    placed = _placements(entries)
    for entry in entries:
        begin, end = placed[entry.name]
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [begin, end]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _refuse(reason: str) -> InvalidHardnessStats:
    return InvalidHardnessStats(f"hardness statistics are not a valid {FORMAT} file: {reason}")


def _check_skeleton(header: bytes) -> None:
    """Refuse any nesting but object -> object -> list, without recursion (module docstring)."""
    skeleton = _JSON_STRING.sub(b"", header).translate(None, _NOT_BRACKETS)
    skeleton = _INNER_LIST.sub(b"", skeleton)  # the lists: shapes and offsets, flat
    skeleton = _INNER_OBJECT.sub(b"", skeleton)  # each tensor's object (and the metadata)
    if skeleton != b"{}":
        raise _refuse("its JSON header nests deeper than a safetensors header does, or its brackets do not match")


def _non_negative_ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise _refuse(f"{what} is {str(value)[:80]}, not a list of non-negative integers")
    return tuple(value)


def _parse_header(raw: bytes, size: int) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """safetensors' own rules: known dtypes, each byte range the size of its shape, ranges contiguous from 0 and
    ending where the file ends."""
    _check_skeleton(raw)
    try:
        header = json.loads(raw)
    except ValueError:  # invalid JSON, invalid UTF-8, or an integer past Python's digit limit
        raise _refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise _refuse("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse("its __metadata__ is not an object of strings")
    tensors: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in ELEMENT_BYTES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise _refuse(f"{name[:80]}: dtype {str(dtype)[:20]!r} is not one of {sorted(ELEMENT_BYTES)}")
        shape = _non_negative_ints(info.get("shape"), f"{name[:80]}'s shape")
        offsets = _non_negative_ints(info.get("data_offsets"), f"{name[:80]}'s data_offsets")
        if len(offsets) != 2 or offsets[1] - offsets[0] != math.prod(shape) * ELEMENT_BYTES[info["dtype"]]:
            raise _refuse(f"{name[:80]}: byte range {list(offsets)[:4]} does not fit its shape {list(shape)[:4]}")
        tensors[name] = StoredTensor(info["dtype"], shape, offsets[0], offsets[1])
    position = 0
    for name, tensor in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if tensor.begin != position:
            raise _refuse(f"{name[:80]} starts at byte {tensor.begin}, expected {position} (a gap or an overlap)")
        position = tensor.end
    data_bytes = size - 8 - len(raw)
    if position != data_bytes:
        raise _refuse(f"its tensors take {position} bytes, the file holds {data_bytes} after the header")
    return meta, tensors


def _check_layout(meta: dict[str, str], tensors: dict[str, StoredTensor]) -> tuple[int, int]:
    if meta.get("format") != FORMAT:
        raise InvalidHardnessStats(
            f"hardness statistics are format {meta.get('format', 'unknown')[:40]!r}, not {FORMAT!r}: "
            "recompute them with `fgs-client hardness-stats`"
        )
    means = tensors.get("means")
    if means is None or len(means.shape) != 2:
        raise _refuse("it lacks 'means' [num_classes, k]")
    num_classes, dim = means.shape
    if len(tensors) != 7 + 2 * num_classes:  # before any loop over the classes: a count the header bounds
        raise _refuse(f"it holds {len(tensors)} tensors; {num_classes} classes need {7 + 2 * num_classes}")
    if meta.get("num_classes") != str(num_classes) or meta.get("dim") != str(dim):
        raise _refuse(
            f"its metadata says {meta.get('num_classes')} classes of {meta.get('dim')} dimensions, its "
            f"means {num_classes} of {dim}"
        )
    ranks = []
    for y in range(num_classes):
        basis = tensors.get(f"class_basis.{y}")
        if basis is None or len(basis.shape) != 2 or basis.shape[0] != dim or basis.shape[1] > dim:
            shape = None if basis is None else list(basis.shape)
            raise _refuse(f"class {y}'s basis is {shape}, expected [{dim}, r] with r <= {dim}")
        ranks.append(basis.shape[1])
    expected = layout(num_classes, dim, ranks)
    for entry in expected:
        stored = tensors.get(entry.name)
        if stored is None or (stored.dtype, stored.shape) != (entry.dtype, entry.shape):
            found = None if stored is None else f"{stored.dtype} {list(stored.shape)}"
            raise _refuse(f"{entry.name} is {found}, expected {entry.dtype} {list(entry.shape)}")
    return num_classes, dim


def read_hardness_header(fd: int) -> HardnessHeader:
    """Read and check the header of the v2 file open as `fd` (pread: the file position is left alone).

    Raises InvalidHardnessStats, whose message says what is wrong, for anything a worker could not score with.
    """
    size = os.fstat(fd).st_size
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        raise _refuse("it is shorter than 8 bytes")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise _refuse(f"its JSON header is {length} bytes, more than the {MAX_HEADER_BYTES} a header may have")
    if length > size - 8:
        raise _refuse(f"its header length {length} runs past the end of the file")
    raw = os.pread(fd, length, 8)
    meta, tensors = _parse_header(raw, size)
    num_classes, dim = _check_layout(meta, tensors)
    return HardnessHeader(meta, 8 + length, tensors, num_classes, dim)


class HardnessStatsFile:
    """A v2 file open for reading: its checked header, and any byte range of a tensor, read with pread.

    Not `safetensors.safe_open`: that maps the whole file into the address space, and the classifier check runs
    under an address-space limit (FGS_CLASSIFIER_CHECK_MEMORY_BYTES) that statistics of several GB would exceed.
    Here a read costs the bytes asked for. The file stays open for the object's life: statistics their tenant
    deletes stay readable to a job already scoring with them (DELETE /v1/classifiers/{classifier_id} lets it finish).
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        try:
            self.header = read_hardness_header(self._file.fileno())
        except BaseException:
            self._file.close()
            raise

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with tensor `name`'s bytes from `offset` (counted from the tensor's first byte)."""
        tensor = self.header.tensors[name]
        if offset < 0 or offset + len(buffer) > tensor.end - tensor.begin:
            raise ValueError(f"{name}: bytes {offset}..{offset + len(buffer)} lie outside the tensor")
        position, done = self.header.data_start + tensor.begin + offset, 0
        while done < len(buffer):
            read = os.preadv(self._file.fileno(), [buffer[done:]], position + done)
            if read == 0:
                raise ValueError(f"{self.path} is shorter than its header says")
            done += read


class HardnessStatsWriter:
    """Writes a v2 file whose layout is known up front, one tensor at a time, in any order.

    The header goes first, so no tensor has to be held until the end: the fit writes each class as soon as it is
    factored. `close` refuses a file left without one of its tensors; `abort` removes a half-written one.
    """

    def __init__(self, path: Path, entries: list[LayoutEntry], meta: dict[str, str]):
        self.entries = {entry.name: entry for entry in entries}
        self._placed = _placements(entries)
        head = encode_header(entries, meta)
        self._data_start = len(head)
        self._file = open(path, "wb")
        self._file.write(head)
        self._file.truncate(self._data_start + sum(entry.nbytes for entry in entries))
        self._written: set[str] = set()

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Write tensor `name`'s bytes (little-endian, C order: `entries[name].nbytes` of them)."""
        begin, end = self._placed[name]
        if len(data) != end - begin:
            raise ValueError(f"{name}: {len(data)} bytes, expected {end - begin}")
        self._file.seek(self._data_start + begin)
        self._file.write(data)
        self._written.add(name)

    def close(self) -> None:
        missing = self._placed.keys() - self._written
        self._file.close()
        if missing:
            raise RuntimeError(f"hardness statistics file left without {sorted(missing)[:5]}")

    def abort(self) -> None:
        """Close and remove a file that a failed fit left half written."""
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)
