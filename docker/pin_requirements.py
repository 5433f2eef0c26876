"""Write the exact versions of fgs's dependency closure for one extra, as the container images install them.

Run it with the interpreter of a virtual environment where the project is installed and tested:

    .venv/bin/python docker/pin_requirements.py service > docker/requirements-api.txt
    .venv/bin/python docker/pin_requirements.py worker  > docker/requirements-worker.txt

The images then install exactly what the tests ran against. torch is written without its local
version label (``2.13.0+cpu`` -> ``2.13.0``): the worker image takes the CUDA build of the same release.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "fgs"


def closure(extra: str) -> dict[str, str]:
    """Canonical name -> installed version for everything `fgs[extra]` pulls in, fgs itself excluded."""
    pinned: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(PROJECT, frozenset({extra}))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        if canonicalize_name(name) != PROJECT:
            pinned[canonicalize_name(name)] = dist.version.split("+", 1)[0]
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            pending.append((req.name, frozenset(req.extras)))
    return pinned


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: pin_requirements.py EXTRA  (service or worker)", file=sys.stderr)
        return 2
    extra = argv[0]
    print(f"# Exact versions for fgs[{extra}], written by docker/pin_requirements.py; do not edit by hand.")
    for name, version in sorted(closure(extra).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
