"""The README's classifier export example runs as written, and both archives it writes load and run the way a
worker loads them (fgs_classifier.registry, which also serves the upload check and the client's pre-flight)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fgs_classifier.registry import load_classifier
from fgs_common.wire import ClassifierSpec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_export_example_writes_archives_fgs_loads(tmp_path, monkeypatch):
    block = re.search(r"<!-- export-example -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    spec = ClassifierSpec.model_validate_json((tmp_path / "spec.json").read_text())
    for name in ("clf.pt", "clf.pt2"):
        classifier = load_classifier(tmp_path / name, spec, None, device="cpu")
        logits, embedding = classifier(torch.rand(5, 3, 48, 48))
        assert logits.shape == (5, 10) and embedding is None
