"""What a classifier archive's code may name, checked without torch or pickle: the operator allow-list, and the
checks of TorchScript source, of an exported program's operator targets and of its symbolic shape expressions
against it.

`fgs_common.classifier_archive` runs these on an archive's code and program JSON before torch reads them
(loading compiles TorchScript code and runs its `__setstate__`; torch.export's loader hands every `expr_str` to
`sympy.sympify`, an eval); `fgs_classifier.graph_check` holds the graphs torch compiled to the same allow-list.
"""

from __future__ import annotations

import ast
import re

from fgs_common.exceptions import UnsafeClassifierArchive

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


def check_torchscript_code(tail: str, source: bytes) -> None:
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


def check_export_program(program) -> None:
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
