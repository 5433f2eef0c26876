"""Recognise an uploaded classifier archive without loading it (no torch, no pickle).

fgs accepts TorchScript archives (`torch.jit.save`) and torch.export archives (`torch.export.save`). A plain
`torch.save` file is a pickle of Python objects: loading it can run arbitrary code, so it is refused here,
by its layout, before anything reads it.
"""

from __future__ import annotations

import zipfile
from enum import Enum
from pathlib import Path


class ArchiveFormat(str, Enum):
    torchscript = "torchscript"
    torch_export = "torch_export"


class NotAClassifierArchive(ValueError):
    """The file is not a TorchScript or torch.export archive."""


def detect_archive_format(path: Path) -> ArchiveFormat:
    """Tell a TorchScript from a torch.export archive by the zip's member names; raise for anything else."""
    if not zipfile.is_zipfile(path):
        raise NotAClassifierArchive(
            "classifier archive is not a zip archive: upload a TorchScript (torch.jit.save) "
            "or torch.export (torch.export.save) file, never a pickle"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise NotAClassifierArchive(f"classifier archive is a damaged zip file: {error}") from error
    # Members live under one top-level folder named after the file at save time.
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in tails and any(t.startswith("models/") for t in tails):
        return ArchiveFormat.torch_export
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return ArchiveFormat.torchscript
    raise NotAClassifierArchive(
        "classifier archive is neither TorchScript nor torch.export (a torch.save pickle is refused): "
        "save it with torch.jit.save(torch.jit.script(model)) or torch.export.save"
    )
