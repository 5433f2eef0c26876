"""Recognise and vet an uploaded classifier archive without loading it (no torch, no pickle, nothing run).

fgs accepts TorchScript archives (`torch.jit.save`) and torch.export archives (`torch.export.save`). Both are zip
files; what torch would do with each member on load decides what may be in them:

- A plain `torch.save` file is a pickle of Python objects: refused by its layout.
- torch.export (`.pt2`): `torch.export.load` unpickles any weight or constant whose config says `use_pickle`,
  `pickle.loads` an `opaque_obj_*` constant, falls back to an unrestricted `torch.load` on sample inputs, loads
  AOTInductor shared libraries, and passes every `expr_str` of the model JSON to `sympy.sympify` (an `eval`).
  So only the plain layout is accepted (JSON, raw tensor bytes, text extras), every operator the graph names
  must be on the allow-list, and every symbolic expression must be arithmetic on shape symbols
  (`fgs_common.classifier_operators`).
- TorchScript (`.pt`): its pickles (`data.pkl`, `constants.pkl`, `*.debug_pkl`) are read by torch's own C++
  unpickler, which builds tensors and TorchScript objects only. Its code is compiled on load and
  `__setstate__` runs then, so the code is scanned (`fgs_common.classifier_operators`) for operators that touch
  files before torch sees it; the loaded graphs are checked again, inlined, by `fgs_classifier.graph_check`.
"""

from __future__ import annotations

import collections
import json
import pickletools
import posixpath
import re
import zipfile
from enum import Enum
from pathlib import Path

from fgs_common.classifier_operators import check_export_program, check_torchscript_code
from fgs_common.exceptions import ArchiveTooLarge, NotAClassifierArchive, UnsafeClassifierArchive


class ArchiveFormat(str, Enum):
    torchscript = "torchscript"
    torch_export = "torch_export"


_TORCHSCRIPT_PICKLES = re.compile(r"(data|constants)\.pkl|code/.+\.debug_pkl")
_TORCHSCRIPT_MEMBERS = re.compile(
    r"version|byteorder|\.data/version|\.data/serialization_id|data/\d+|code/.+\.py|extra/.+"
)
_EXPORT_FIXED_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
    }
)
# torch stores tensors uncompressed, so a real archive unpacks to about its own size: twice the largest upload
# (FGS_MAX_CLASSIFIER_BYTES, 512 MiB) leaves room, and a zip bomb is refused before anything decompresses it.
DEFAULT_MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
# JSON and code members are read whole into memory: bound them before reading. The code of all TorchScript
# members together is parsed in the API process. The SmallCNN's is 16 KB, and code grows with the number of
# distinct module classes, not with depth: 16 MiB bounds the parse's time and memory (an AST takes tens of times
# its source) with room to spare.
_MAX_TEXT_MEMBER_BYTES = 64 * 1024 * 1024
_MAX_CODE_BYTES = 16 * 1024 * 1024


def detect_archive_format(path: Path) -> ArchiveFormat:
    """Tell a TorchScript from a torch.export archive by the zip's member names; raise for anything else."""
    names = _member_names(path)
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails and any(t.startswith("models/") for t in tails):
        return ArchiveFormat.torch_export
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return ArchiveFormat.torchscript
    raise NotAClassifierArchive(
        "classifier archive is neither TorchScript nor torch.export (a torch.save pickle is refused): "
        "save it with torch.jit.save(torch.jit.script(model)) or torch.export.save"
    )


def inspect_archive(path: Path, max_unpacked_bytes: int) -> ArchiveFormat:
    """The archive's format once everything torch would read from it is known to be safe; raise otherwise.

    Raises NotAClassifierArchive (not a classifier archive), ArchiveTooLarge or UnsafeClassifierArchive.
    """
    archive_format = detect_archive_format(path)
    with zipfile.ZipFile(path) as archive:
        members = _members_under_one_root(archive, max_unpacked_bytes)
        if archive_format is ArchiveFormat.torchscript:
            _check_torchscript_members(archive, members)
        else:
            _check_export_members(archive, members)
    return archive_format


def _member_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        raise NotAClassifierArchive(
            "classifier archive is not a zip archive: upload a TorchScript (torch.jit.save) "
            "or torch.export (torch.export.save) file, never a pickle"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile as error:
        raise NotAClassifierArchive(f"classifier archive is a damaged zip file: {error}") from error


def _members_under_one_root(archive: zipfile.ZipFile, max_unpacked_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """Members by path below the archive's single top-level folder (torch writes exactly one)."""
    infos = archive.infolist()
    unpacked = sum(info.file_size for info in infos)
    if unpacked > max_unpacked_bytes:
        raise ArchiveTooLarge(
            f"classifier archive unpacks to {unpacked} bytes, over the limit of {max_unpacked_bytes} "
            "(FGS_MAX_CLASSIFIER_UNPACKED_BYTES)"
        )
    roots = {info.filename.split("/", 1)[0] for info in infos}
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        root, _, tail = name.partition("/")
        if len(roots) != 1 or not tail or name.startswith("/") or "\\" in name or posixpath.normpath(name) != name:
            raise UnsafeClassifierArchive(f"classifier archive member {name[:200]!r} is not below one top-level folder")
        if tail in members:
            raise UnsafeClassifierArchive(f"classifier archive holds {tail[:200]!r} twice")
        members[tail] = info
    return members


def _looks_like_pickle(data: bytes) -> bool:
    """Whether `data` parses as one whole pickle opcode stream (read with pickletools, which runs nothing)."""
    if not data.rstrip().endswith(b"."):
        return False
    try:
        tail = collections.deque(pickletools.genops(data), maxlen=1)  # reads the whole stream, keeps the last op
        last = tail[0] if tail else None
    except Exception:  # pickletools raises ValueError and others on what is not a pickle
        return False
    return last is not None and last[0].name == "STOP"


def _read_text_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.file_size > _MAX_TEXT_MEMBER_BYTES:
        raise ArchiveTooLarge(
            f"classifier archive member {info.filename[:200]!r} is over {_MAX_TEXT_MEMBER_BYTES} bytes"
        )
    return archive.read(info)


# ---------------------------------------------------------------- TorchScript


def _check_torchscript_members(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> None:
    code_bytes = sum(info.file_size for tail, info in members.items() if tail.startswith("code/"))
    if code_bytes > _MAX_CODE_BYTES:
        raise ArchiveTooLarge(f"TorchScript archive holds {code_bytes} bytes of code, over {_MAX_CODE_BYTES}")
    for tail, info in members.items():
        if _TORCHSCRIPT_PICKLES.fullmatch(tail):
            continue  # read by torch's C++ unpickler, which builds tensors and TorchScript objects only
        if tail.endswith(".pkl") or not _TORCHSCRIPT_MEMBERS.fullmatch(tail):
            raise UnsafeClassifierArchive(
                f"TorchScript archive member {tail[:200]!r} is not part of a torch.jit.save archive"
            )
        if tail.startswith(("code/", "extra/")):
            data = _read_text_member(archive, info)
            if _looks_like_pickle(data):
                raise UnsafeClassifierArchive(f"TorchScript archive member {tail[:200]!r} is a pickle stream")
            if tail.startswith("code/"):
                check_torchscript_code(tail, data)


# ---------------------------------------------------------------- torch.export


def _check_export_members(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> None:
    if "models/model.json" not in members:
        raise UnsafeClassifierArchive("torch.export archive has no models/model.json (one program named 'model')")
    tensor_files: set[str] = set()
    for directory, prefix in (("weights", "weight_"), ("constants", "tensor_")):
        config_name = f"data/{directory}/model_{directory}_config.json"
        if config_name not in members:
            raise UnsafeClassifierArchive(f"torch.export archive has no {config_name}")
        config = _json_member(archive, members[config_name])
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise UnsafeClassifierArchive(f"torch.export archive's {config_name} has no 'config' mapping")
        for fqn, payload in entries.items():
            if not isinstance(payload, dict):
                raise UnsafeClassifierArchive(f"torch.export {directory} entry {str(fqn)[:200]!r} is not an object")
            if payload.get("use_pickle") is not False:
                raise UnsafeClassifierArchive(
                    f"torch.export {directory} entry {str(fqn)[:200]!r} is stored as a pickle (use_pickle); "
                    "pickles are never loaded: export plain tensors (no tensor subclasses or custom objects)"
                )
            path_name = payload.get("path_name")
            if not (isinstance(path_name, str) and re.fullmatch(rf"{prefix}\d+", path_name)):
                raise UnsafeClassifierArchive(
                    f"torch.export {directory} entry {str(fqn)[:200]!r} is not a raw tensor file ({prefix}N); "
                    "custom or opaque objects are refused"
                )
            if payload.get("tensor_meta") is None:
                raise UnsafeClassifierArchive(f"torch.export {directory} entry {str(fqn)[:200]!r} has no tensor_meta")
            tensor_files.add(f"data/{directory}/{path_name}")
    for tail, info in members.items():
        if tail in _EXPORT_FIXED_MEMBERS or tail in tensor_files:
            continue
        if tail.startswith("extra/") and not tail.endswith(".pkl"):
            if _looks_like_pickle(_read_text_member(archive, info)):
                raise UnsafeClassifierArchive(f"torch.export archive member {tail[:200]!r} is a pickle stream")
            continue
        raise UnsafeClassifierArchive(
            f"torch.export archive member {tail[:200]!r} is not part of a plain torch.export.save archive "
            "(pickled objects, AOTInductor libraries and legacy weight files are refused)"
        )
    if _read_text_member(archive, members["archive_format"]).strip() != b"pt2":
        raise UnsafeClassifierArchive("torch.export archive's archive_format is not 'pt2'")
    check_export_program(_json_member(archive, members["models/model.json"]))


def _json_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    try:
        return json.loads(_read_text_member(archive, info))
    except (ValueError, RecursionError):
        raise UnsafeClassifierArchive(f"torch.export archive member {info.filename[:200]!r} is not JSON") from None
