"""The arrows between the packages point one way (docs/ARCHITECTURE.md, "Import rules").

The check is static: every `import` statement in a package's files, function-local ones included, so a lazy
import cannot slip past it. A second test imports the whole worker with scikit-learn made unimportable, and a
third reads the worker image's build context off its .dockerignore. Within a package no modules import each other
in a cycle, however lazily (the original code's http_client <-> balance_runner is what it catches).
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import. Each package's folder is found in the tree
# (`<folder>/<package>/__init__.py`, the folder named as the import), not written here.
TORCH_HEAVY = {"torch", "diffusers", "transformers", "safetensors", "fgs_classifier", "fgs_worker"}
OUR_OTHERS = {"fgs_service", "fgs_worker", "fgs_client", "fgs_classifier", "fgs_lab"}
RULES: dict[str, set[str]] = {
    "fgs_common": OUR_OTHERS | TORCH_HEAVY | {"fastapi", "starlette", "rq"},
    "fgs_service": TORCH_HEAVY | {"fgs_client", "fgs_lab", "sklearn"},
    "fgs_classifier": {"fgs_service", "fgs_worker", "fgs_client", "fgs_lab", "fastapi", "sklearn"},
    "fgs_worker": {"fgs_service", "fgs_client", "fgs_lab", "fastapi", "sklearn"},
    "fgs_client": TORCH_HEAVY | {"fgs_service", "fgs_lab"},
}
# The client's training utilities are its `train` extra: they may use torch and the classifier package.
# RQ's internals have one home, shared by the API and the worker: fgs_common.rq_adapter (pinned by
# tests/test_rq_adapter.py).
EXCEPTIONS = {
    "client/fgs_client/training.py": {"torch", "safetensors", "fgs_classifier"},
    "common/fgs_common/rq_adapter.py": {"rq"},
}


def package_folder(package: str) -> Path:
    """The one folder `*/<package>/` holding the package's `__init__.py`."""
    found = sorted(REPO.glob(f"*/{package}/__init__.py"))
    assert len(found) == 1, f"{package}: expected one */{package}/__init__.py, found {found}"
    return found[0].parent


def test_every_package_has_a_rule():
    """A new fgs_* package in the tree cannot go unchecked."""
    in_tree = {init.parent.name for init in REPO.glob("*/fgs_*/__init__.py")}
    assert in_tree - {"fgs_lab"} == set(RULES)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def forbidden_imports(package: str) -> list[str]:
    forbidden = RULES[package]
    problems = []
    for path in sorted(package_folder(package).rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        allowed = EXCEPTIONS.get(relative, set())
        for line, module in imported_modules(path):
            if module in forbidden and module not in allowed:
                problems.append(f"{relative}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_point_one_way(package):
    assert forbidden_imports(package) == []


def test_the_rule_catches_a_lazy_forbidden_import(tmp_path, monkeypatch):
    """A function-local `import fgs_client` inside the worker is found (the check itself can fail)."""
    fake_repo = tmp_path / "repo"
    package = fake_repo / "worker" / "fgs_worker"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text("def run():\n    from fgs_client.cli import app\n    return app\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    assert forbidden_imports("fgs_worker") == ["worker/fgs_worker/jobs.py:2 imports fgs_client"]


def module_name(path: Path, folder: Path) -> str:
    """`wire/jobs.py` -> `wire.jobs`; a subpackage's `wire/__init__.py` -> `wire` (what `import ...wire` runs)."""
    parts = path.relative_to(folder).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def module_imports(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (function-local imports included)."""
    modules = {module_name(path, folder): path for path in folder.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        prefix = package + "."
        graph[name] = {t[len(prefix) :] for t in targets if t.startswith(prefix) and t[len(prefix) :] in modules} - {
            name
        }
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] when there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return []
        for target in sorted(graph[node]):
            cycle = visit(target, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return []


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_two_modules_of_a_package_import_each_other(package):
    folder = package_folder(package)
    assert import_cycle(module_imports(folder, package)) == []


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    """A module that imports another lazily, inside a method, still closes a cycle (the check itself can fail)."""
    (tmp_path / "http_client.py").write_text("def balance():\n    from fgs_client.balance_runner import run\n")
    (tmp_path / "balance_runner.py").write_text("from fgs_client.http_client import Client\n")
    (tmp_path / "cli.py").write_text("from fgs_client import http_client\n")
    graph = module_imports(tmp_path, "fgs_client")
    assert graph == {"http_client": {"balance_runner"}, "balance_runner": {"http_client"}, "cli": {"http_client"}}
    assert import_cycle(graph) == ["balance_runner", "http_client", "balance_runner"]


def test_the_cycle_check_sees_a_subpackage_init(tmp_path):
    """A family module that imports its own package's entry point closes a cycle through the `__init__`."""
    (tmp_path / "wire").mkdir()
    (tmp_path / "wire" / "__init__.py").write_text("from fgs_common.wire.jobs import JobState\n")
    (tmp_path / "wire" / "jobs.py").write_text("from fgs_common.wire import GenerateRequest\n")
    graph = module_imports(tmp_path, "fgs_common")
    assert import_cycle(graph) == ["wire", "wire.jobs", "wire"]


WIRE = "fgs_common.wire"


def python_files() -> list[Path]:
    """Every Python file of the repository (packages, tests, lab, bench, examples, scripts), virtualenvs and other
    hidden folders left out."""
    return [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]


def test_the_wire_has_one_entry_point():
    """`from fgs_common.wire import X` is the one way in: outside the package nothing imports a family module
    (`fgs_common.wire.jobs`), so a model can move between families without an import changing."""
    wire_folder = package_folder("fgs_common") / "wire"
    problems = []
    for path in python_files():
        if path.is_relative_to(wire_folder):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            problems += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names if n.startswith(WIRE + ".")
            ]
    assert problems == []


def test_the_wire_entry_point_exports_every_family_model():
    """Each public name a family defines is importable from `fgs_common.wire` (the entry point forgets none)."""
    import importlib
    import pkgutil

    wire = importlib.import_module(WIRE)
    missing = []
    for info in pkgutil.iter_modules(wire.__path__):
        family = importlib.import_module(f"{WIRE}.{info.name}")
        tree = ast.parse(Path(family.__file__).read_text(encoding="utf-8"))
        defined = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        defined += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
        missing += [f"{info.name}.{name}" for name in defined if not name.startswith("_") and not hasattr(wire, name)]
    assert missing == []


@pytest.mark.stack  # a fresh interpreter
def test_worker_imports_without_scikit_learn():
    """Every fgs_worker module imports with sklearn made unimportable (the worker extra does not install it)."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['sklearn'] = None  # any `import sklearn` now raises ImportError\n"
        "import fgs_worker, fgs_classifier\n"
        "for package in (fgs_worker, fgs_classifier):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "assert 'fgs_client' not in sys.modules and 'fgs_lab' not in sys.modules\n"
        "print('imported', len([m for m in sys.modules if m.startswith(('fgs_worker', 'fgs_classifier'))]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 10


TRAINING_MODULES = {"client/fgs_client/training.py", "classifier/fgs_classifier/small_cnn.py"}


def docker_context(dockerignore: Path) -> list[str]:
    """Tracked files that reach the build context: the .dockerignore's patterns in order, the last one that
    matches a file or a folder above it decides (`!` lets it in)."""
    rules = []
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), line.lstrip("!").rstrip("/")))
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()

    def kept(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for excludes, pattern in rules:
            if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
                excluded = excludes
        return not excluded

    return [f for f in tracked if kept(f)]


@pytest.mark.stack  # git ls-files
@pytest.mark.parametrize("image", ["worker", "api"])
def test_image_build_context_holds_no_training_code(image):
    context = docker_context(REPO / "docker" / f"Dockerfile.{image}.dockerignore")
    assert {
        "worker/fgs_worker/main.py",
        "service/fgs_service/app.py",
        "classifier/fgs_classifier/registry.py",
        "pyproject.toml",
    } <= set(context)
    training = [f for f in context if f.split("/")[0] in ("lab", "examples", "bench", "tests") or f in TRAINING_MODULES]
    assert training == []
