"""The operator allow-list, checked over a loaded classifier's graphs before any of them runs.

`fgs_common.classifier_operators` already refused archives whose code or program JSON names a denied operator; this
is the check on what torch actually compiled: every method of every submodule of a TorchScript module, with
calls inlined, and every node of every graph of an exported program. Allowed: operators of the aten and prim
namespaces, except those that read or write files and those that reach memory through indices, sizes, strides or
storage the classifier chose without a bounds check (`memory_unsafe`); for exported programs also shape arithmetic.
"""

from __future__ import annotations

import functools

import torch

from fgs_common.classifier_operators import ALLOWED_EXPORT_CALLABLES, ALLOWED_OP_NAMESPACES, DENIED_OP_NAMES
from fgs_common.exceptions import UnsafeClassifierArchive

# Calls that inlining leaves in place are calls into C++ custom classes or module interfaces: code we cannot see.
_OPAQUE_CALLS = frozenset({"prim::CallMethod", "prim::CallFunction"})


@functools.cache
def _file_operators() -> frozenset[str]:
    """Every registered operator with a string argument naming a file (aten::from_file, aten::save, ...)."""
    named = set()
    for schema in torch._C._jit_get_all_schemas():
        for argument in schema.arguments:
            if "str" in str(argument.type) and any(word in argument.name.lower() for word in ("file", "path")):
                named.add(schema.name)
    return frozenset(named)


# Operators that read or write memory where a classifier's own indices, sizes or strides say, unchecked. Issue 19:
# `_sparse_coo_tensor_unsafe(index, values, [4]).to_dense()` with an out-of-range index wrote out of bounds and
# crashed the worker. By name: anything `unsafe` (`_sparse_coo_tensor_unsafe`, `_unsafe_index`, `unsafe_split`),
# anything sparse (constructors and conversions: a sparse tensor is tenant-built indices), `to_dense`, views by
# raw strides (`as_strided*`), storage-level operators, nested tensors built from a buffer and offsets, and the
# index_put whose `unsafe` flag skips the bounds check.
_MEMORY_UNSAFE_WORDS = ("unsafe", "sparse", "storage")
_MEMORY_UNSAFE_PREFIXES = ("as_strided", "_nested_", "to_dense", "_to_dense", "coalesce", "_coalesce")
_MEMORY_UNSAFE_NAMES = frozenset(
    {
        "set_",
        "set",
        "set_data",
        "_index_put_impl_",
        "_index_put_impl",
        "indices",
        "_indices",
        "_values",
        "crow_indices",
        "col_indices",
        "ccol_indices",
        "row_indices",
        "_reshape_alias",
        "_reshape_alias_copy",
    }
)


def memory_unsafe(name: str) -> bool:
    """Whether an operator (its name without namespace and overload) is refused as `_MEMORY_UNSAFE_WORDS` says."""
    if name.startswith("is_"):  # questions (is_sparse), not accesses
        return False
    return (
        any(word in name for word in _MEMORY_UNSAFE_WORDS)
        or name.startswith(_MEMORY_UNSAFE_PREFIXES)
        or name in _MEMORY_UNSAFE_NAMES
    )


def _check_operator(kind: str, where: str) -> None:
    namespace, _, name = kind.partition("::")
    if namespace not in ALLOWED_OP_NAMESPACES:
        raise UnsafeClassifierArchive(
            f"{where} uses operator {kind[:200]!r}; only {sorted(ALLOWED_OP_NAMESPACES)} operators are allowed"
        )
    if name in DENIED_OP_NAMES or kind in _file_operators():
        raise UnsafeClassifierArchive(f"{where} uses {kind[:200]!r}: classifiers may not read or write files")
    if memory_unsafe(name.split(".", 1)[0]):
        raise UnsafeClassifierArchive(
            f"{where} uses {kind[:200]!r}: classifiers may not use sparse tensors, raw strides, storage or unchecked "
            "indexing (operators that can reach memory out of bounds)"
        )


def _walk_script_nodes(block, where: str) -> None:
    for node in block.nodes():
        kind = node.kind()
        if kind in _OPAQUE_CALLS:
            raise UnsafeClassifierArchive(
                f"{where} calls code that cannot be inspected ({kind}: a C++ class or interface)"
            )
        _check_operator(kind, where)
        for output in node.outputs():
            if "torch.classes" in output.type().annotation_str:
                raise UnsafeClassifierArchive(f"{where} uses a C++ custom class ({output.type().annotation_str[:200]})")
        for inner in node.blocks():
            _walk_script_nodes(inner, where)


def check_script_module(module: torch.jit.ScriptModule) -> None:
    """Every method of every submodule, inlined (a loaded module's `__setstate__` included)."""
    for module_name, submodule in module.named_modules():
        for method_name in submodule._c._method_names():
            graph = submodule._c._get_method(method_name).graph.copy()
            torch._C._jit_pass_inline(graph)
            _walk_script_nodes(graph, f"TorchScript method {(module_name + '.' if module_name else '') + method_name}")


def check_exported_program(program: torch.export.ExportedProgram) -> None:
    """Every node of the program's graph and of any graph nested in it."""
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op in ("call_module", "call_method"):
                raise UnsafeClassifierArchive(f"exported graph has a {node.op} node ({str(node.target)[:200]})")
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                _check_operator(target._schema.name, "exported graph")
                continue
            if isinstance(target, torch._ops.OpOverloadPacket):
                _check_operator(target._qualified_op_name, "exported graph")
                continue
            qualified = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"
            if qualified not in ALLOWED_EXPORT_CALLABLES:
                raise UnsafeClassifierArchive(
                    f"exported graph calls {qualified[:200]!r}: only aten/prim operators allowed"
                )
