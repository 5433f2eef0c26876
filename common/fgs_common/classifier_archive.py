"""Recognise and vet an uploaded classifier archive without loading it (no torch, no pickle, nothing run).

fgs accepts TorchScript archives (`torch.jit.save`) and torch.export archives (`torch.export.save`). Both are zip
files; what torch would do with each member on load decides what may be in them:

- A plain `torch.save` file is a pickle of Python objects: refused by its layout.
- torch.export (`.pt2`): `torch.export.load` unpickles any weight or constant whose config says `use_pickle`,
  `pickle.loads` an `opaque_obj_*` constant, falls back to an unrestricted `torch.load` on sample inputs, loads
  AOTInductor shared libraries, and passes every `expr_str` of the model JSON to `sympy.sympify` (an `eval`).
  So only the plain layout is accepted (JSON, raw tensor bytes, text extras), every operator the graph names
  must be on the allow-list below, and every symbolic expression must be arithmetic on shape symbols.
- TorchScript (`.pt`): its pickles (`data.pkl`, `constants.pkl`, `*.debug_pkl`) are read by torch's own C++
  unpickler, which builds tensors and TorchScript objects only. Its code is compiled on load and
  `__setstate__` runs then, so the code is scanned here for operators that touch files before torch sees it;
  the loaded graphs are checked again, inlined, by `fgs_classifier.graph_check`.
"""

from __future__ import annotations

import ast
import collections
import json
import pickletools
import posixpath
import re
import zipfile
from enum import Enum
from pathlib import Path


class ArchiveFormat(str, Enum):
    torchscript = "torchscript"
    torch_export = "torch_export"


class NotAClassifierArchive(ValueError):
    """The file is not a TorchScript or torch.export archive."""


class UnsafeClassifierArchive(ValueError):
    """The archive is a classifier archive, but loading or running it could run code or touch the host."""


class ArchiveTooLarge(ValueError):
    """The archive unpacks to more bytes than fgs accepts (a zip bomb, or simply too big)."""


# Operators an archive may use: the tensor library (aten) and TorchScript's control flow and containers (prim).
# Other namespaces are collectives (c10d, symm_mem), profiler hooks, debugging loaders or custom C++ code.
ALLOWED_OP_NAMESPACES = frozenset({"aten", "prim"})
# Operators of those namespaces that read or write files (torch.from_file, torch.save) or load code or data by
# name. The graph check adds every operator whose schema takes a file name.
DENIED_OP_NAMES = frozenset({"from_file", "save", "load", "_load", "load_library", "_load_for_lite_interpreter"})
# Python callables an exported graph may call besides aten ops: arithmetic on shapes (dynamic batch).
ALLOWED_EXPORT_CALLABLES = frozenset(
    {
        f"_operator.{name}"
        for name in (
            "getitem",
            "add",
            "sub",
            "mul",
            "floordiv",
            "truediv",
            "mod",
            "pow",
            "neg",
            "pos",
            "abs",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "and_",
            "or_",
            "not_",
        )
    }
    | {f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")}
    | {f"torch.{name}" for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt")}
)
# What torch.export's deserializer hands to sympy (torch/_export/serde/serialize.py, `sympy_functions`).
_SYMPY_FUNCTIONS = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Mod",
        "FloorDiv",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "ModularIndexing",
        "Where",
        "IsNonOverlappingAndDenseIndicator",
        "oo",
    }
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,3}\d+")
_SYMBOL_ASSUMPTIONS = frozenset({"positive", "integer", "real", "nonnegative", "negative", "finite"})
_EXPORT_TARGET = re.compile(r"torch\.ops\.(?P<namespace>\w+)\.(?P<name>\w+)\.(?P<overload>\w+)")

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
                _check_torchscript_code(tail, data)


def _check_torchscript_code(tail: str, source: bytes) -> None:
    """Refuse code that names a denied operator, a non-allowed op namespace or a C++ custom class.

    Runs before torch.jit.load because loading compiles this code and runs any `__setstate__` in it. Denied names
    are refused wherever they appear (attribute, name or string: `getattr(torch, "from_file")` too).
    """
    try:
        tree = ast.parse(source.decode("utf-8"), filename=tail)
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as error:
        raise UnsafeClassifierArchive(
            f"TorchScript code {tail[:200]!r} cannot be read: {type(error).__name__}"
        ) from None
    for node in ast.walk(tree):
        word = None
        if isinstance(node, ast.Attribute):
            word = node.attr
            namespace_of = _dotted(node.value)  # `ops.aten.relu` as TorchScript writes it, or `torch.ops.aten.relu`
            if namespace_of in ("ops", "torch.ops") and node.attr not in ALLOWED_OP_NAMESPACES:
                raise UnsafeClassifierArchive(
                    f"TorchScript code {tail[:200]!r} calls operators of namespace {node.attr[:80]!r}; "
                    f"only {sorted(ALLOWED_OP_NAMESPACES)} are allowed"
                )
        elif isinstance(node, ast.Name):
            word = node.id
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            word = node.value
            if "torch.classes" in word:
                raise UnsafeClassifierArchive(
                    f"TorchScript code {tail[:200]!r} uses a C++ custom class (torch.classes)"
                )
        if word in DENIED_OP_NAMES:
            raise UnsafeClassifierArchive(
                f"TorchScript code {tail[:200]!r} uses {word!r}: classifiers may not read or write files "
                "or load code (torch.from_file, torch.save, torch.load are refused)"
            )
        if (
            word == "classes"
            and isinstance(node, ast.Attribute)
            and _dotted(node.value) in ("torch", "__torch__.torch")
        ):
            raise UnsafeClassifierArchive(f"TorchScript code {tail[:200]!r} uses a C++ custom class (torch.classes)")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


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
    _check_export_program(_json_member(archive, members["models/model.json"]))


def _json_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    try:
        return json.loads(_read_text_member(archive, info))
    except (ValueError, RecursionError):
        raise UnsafeClassifierArchive(f"torch.export archive member {info.filename[:200]!r} is not JSON") from None


def _check_export_program(program) -> None:
    """Every operator target and every symbolic expression anywhere in the serialized program."""
    stack = [program]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key in ("target", "as_operator") and isinstance(item, str):
                    check_export_target(item)
                elif key == "expr_str":
                    check_symbolic_expression(item)
                else:
                    stack.append(item)


def check_export_target(target: str) -> None:
    """An exported graph may call allowed aten/prim operators and shape arithmetic, nothing else."""
    if target in ALLOWED_EXPORT_CALLABLES:
        return
    match = _EXPORT_TARGET.fullmatch(target)
    if match is None or match["namespace"] not in ALLOWED_OP_NAMESPACES:
        raise UnsafeClassifierArchive(
            f"exported graph calls {target[:200]!r}: only aten/prim operators and shape arithmetic are allowed "
            "(no higher-order, custom or Python operators)"
        )
    if match["name"] in DENIED_OP_NAMES:
        raise UnsafeClassifierArchive(f"exported graph calls {target[:200]!r}: classifiers may not read or write files")


def check_symbolic_expression(expression) -> None:
    """Arithmetic on shape symbols only: torch hands this string to sympy.sympify, which evaluates it as Python."""
    if not isinstance(expression, str) or len(expression) > 2000:
        raise UnsafeClassifierArchive("exported program holds a symbolic shape expression that is not a short string")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise UnsafeClassifierArchive(
            f"exported program holds an unreadable shape expression {expression[:100]!r}"
        ) from None
    for node in ast.walk(tree):
        if isinstance(
            node,
            (
                ast.Expression,
                ast.BinOp,
                ast.UnaryOp,
                ast.Compare,
                ast.BoolOp,
                ast.Load,
                ast.operator,
                ast.unaryop,
                ast.cmpop,
                ast.boolop,
            ),
        ):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
            continue
        if isinstance(node, ast.Name) and (node.id in _SYMPY_FUNCTIONS or _SYMBOL_NAME.fullmatch(node.id)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_FUNCTIONS:
            if node.func.id == "Symbol":
                if not (
                    len(node.args) == 1
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and _SYMBOL_NAME.fullmatch(node.args[0].value)
                ):
                    break
                if any(
                    k.arg not in _SYMBOL_ASSUMPTIONS
                    or not isinstance(k.value, ast.Constant)
                    or not isinstance(k.value.value, bool)
                    for k in node.keywords
                ):
                    break
                continue
            if not node.keywords:
                continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SYMBOL_NAME.fullmatch(node.value):
            continue  # the name inside Symbol('s0', ...), checked with its call above
        if isinstance(node, ast.keyword):
            continue  # checked with their Symbol call above
        break
    else:
        return
    raise UnsafeClassifierArchive(
        f"exported program holds a shape expression that is not shape arithmetic: {expression[:100]!r}"
    )
