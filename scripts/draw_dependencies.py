"""Draw the packages and the arrows between them, as a tool that maps imports to paths sees them.

    .venv/bin/python scripts/draw_dependencies.py      # -> docs/dependencies.dot and docs/dependencies.png

The reading is pydeps' (a third-party import-to-path tool, the `dev` extra): for each `*/fgs_*/` package folder
it follows the imports with nothing on the path but the package folders themselves, so an arrow exists only
where an import resolves to a file of ours. Each module-level arrow is folded into its package; the drawing
labels an arrow with the number of its package's modules that import the other and colours it red when the import rules
(`tests/test_import_rules.py`) forbid it. Exit status 1 when any arrow is red. `dot` (Debian's graphviz) renders
the PNG.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# Third-party packages pydeps need not walk into (minutes of bytecode scanning for torch alone; no fgs_ inside).
NOT_FOLLOWED = (
    "torch diffusers transformers accelerate huggingface_hub safetensors numpy scipy sklearn PIL matplotlib datasets"
    " pyarrow rq redis pydantic pydantic_settings fastapi starlette uvicorn httpx typer rich playwright"
).split()


def package_folders() -> dict[str, Path]:
    """Every `<folder>/fgs_*/` package of the tree: the folder is named as the import."""
    return {init.parent.name: init.parent for init in sorted(REPO.glob("*/fgs_*/__init__.py"))}


def import_rules() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The forbidden imports per package and the per-file exceptions, read from the test that enforces them (one
    definition)."""
    spec = importlib.util.spec_from_file_location("import_rules", REPO / "tests" / "test_import_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RULES, module.EXCEPTIONS


def module_imports(package: str, folder: Path, path: list[Path]) -> dict[str, dict]:
    """pydeps' view of one package: every fgs_* module it reaches, with the file it maps to and its imports."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    command = [sys.executable, "-m", "pydeps", str(folder), "--show-deps", "--no-output", "--noshow"]
    command += ["--only", "fgs_", "--max-bacon", "0", "-x", *(f"{name}*" for name in NOT_FOLLOWED)]
    found = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(found.stdout)


def main() -> int:
    folders = package_folders()
    path = sorted({folder.parent for folder in folders.values()})
    rules, exceptions = import_rules()
    arrows: collections.Counter[tuple[str, str]] = collections.Counter()
    forbidden: set[tuple[str, str]] = set()
    for package, folder in folders.items():
        for module, facts in module_imports(package, folder, path).items():
            source = module.split(".")[0]
            if source != package or not str(facts.get("path", "")).startswith(str(folder)):
                continue  # a module of another package, seen from here: counted when that package is read
            allowed_here = exceptions.get(str(Path(facts["path"]).relative_to(REPO)), set())
            for target in {t.split(".")[0] for t in facts.get("imports", [])} - {package}:
                arrows[(package, target)] += 1
                if target in rules.get(package, set()) - allowed_here:
                    forbidden.add((package, target))
    lines = ["digraph packages {", "  rankdir=BT; node [shape=box, fontname=Helvetica];"]
    for package, folder in folders.items():
        lines.append(f'  {package} [label="{package}\\n{folder.relative_to(REPO)}/"];')
    for (a, b), count in sorted(arrows.items()):
        colour = "red" if (a, b) in forbidden else "black"
        lines.append(f'  {a} -> {b} [label="{count}", color={colour}, fontcolor={colour}];')
    lines.append("}")
    DOCS.mkdir(exist_ok=True)
    (DOCS / "dependencies.dot").write_text("\n".join(lines) + "\n")
    if shutil.which("dot"):
        png = ["dot", "-Tpng", "-Gdpi=110", "-o", str(DOCS / "dependencies.png"), str(DOCS / "dependencies.dot")]
        subprocess.run(png, check=True)
    else:
        print("no `dot` here (Debian's graphviz): wrote the .dot only")
    for (a, b), count in sorted(arrows.items()):
        print(f"{a:15} -> {b:15} {count:3} modules{'   FORBIDDEN' if (a, b) in forbidden else ''}")
    print(f"wrote {DOCS / 'dependencies.dot'} and {DOCS / 'dependencies.png'}")
    return 1 if forbidden else 0


if __name__ == "__main__":
    sys.exit(main())
