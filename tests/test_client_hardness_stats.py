"""`fgs-client hardness-stats`: embeddings of a TorchScript classifier over the real training set, fitted by
HardnessStats."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from fgs_classifier.hardness_stats import HardnessStats
from fgs_client.cli import app
from support.tiny_classifier import TinyClassifier

runner = CliRunner()


def test_hardness_stats_of_a_torchscript_classifier(tmp_path):
    root = tmp_path / "data"
    pixels = {}
    for class_index, class_name in enumerate(("ant", "bee")):
        (root / class_name).mkdir(parents=True)
        for i in range(5):
            array = np.random.default_rng(10 * class_index + i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / class_name / f"{i}.png")
            pixels[(class_index, i)] = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    (root / "ant" / "junk.txt").write_text("not an image")
    model = TinyClassifier().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "clf.pt"))
    spec = {"num_classes": 2, "input_size": 8, "output": "logits_embedding", "mean": [0.5], "std": [0.5]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    result = runner.invoke(
        app,
        [
            "hardness-stats",
            "--dataset",
            "imagefolder",
            "--root",
            str(root),
            "--classifier",
            str(tmp_path / "clf.pt"),
            "--spec",
            str(tmp_path / "spec.json"),
            "--out",
            str(tmp_path / "stats.safetensors"),
        ],
    )

    assert result.exit_code == 0, result.output
    stats = HardnessStats.load(tmp_path / "stats.safetensors")
    with torch.no_grad():
        expected = [model((torch.stack([pixels[(c, i)] for i in range(5)]) - 0.5) / 0.5)[1].mean(0) for c in range(2)]
    assert stats.counts.tolist() == [5, 5]
    assert torch.allclose(stats.means, torch.stack(expected), atol=1e-4)
    assert stats.precisions.shape == (2, 4, 4)


def test_hardness_stats_refuses_a_logits_only_classifier(tmp_path):
    root = tmp_path / "data"
    for class_name in ("ant", "bee"):
        (root / class_name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / class_name / "0.png")
    torch.jit.save(torch.jit.script(TinyClassifier().eval()), str(tmp_path / "clf.pt"))
    (tmp_path / "spec.json").write_text(json.dumps({"num_classes": 3, "input_size": 8}))
    result = runner.invoke(
        app,
        [
            "hardness-stats",
            "--dataset",
            "imagefolder",
            "--root",
            str(root),
            "--classifier",
            str(tmp_path / "clf.pt"),
            "--spec",
            str(tmp_path / "spec.json"),
            "--out",
            str(tmp_path / "stats.safetensors"),
        ],
    )
    assert result.exit_code == 2
    assert "2 classes, the classifier spec 3" in result.output
