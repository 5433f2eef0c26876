"""`python -m fgs_classifier.check ARCHIVE SPEC_JSON [HARDNESS_STATS]`: load a classifier as a worker would.

The API runs this in a subprocess before it stores an upload (the API itself never imports torch).
Exit 0: the archive loads and its outputs match the spec. Exit 2: they do not; the reason is the last
line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fgs_common.wire import ClassifierSpec


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m fgs_classifier.check ARCHIVE SPEC_JSON [HARDNESS_STATS]", file=sys.stderr)
        return 64
    from fgs_classifier.registry import load_classifier
    from fgs_common.exceptions import InvalidClassifier

    spec = ClassifierSpec.model_validate_json(Path(argv[1]).read_text())
    try:
        load_classifier(Path(argv[0]), spec, Path(argv[2]) if len(argv) == 3 else None, device="cpu")
    except InvalidClassifier as error:
        print(" ".join(str(error).split()), file=sys.stderr)
        return 2
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
