"""A small CNN classifier and its export to the archive format fgs accepts (TorchScript + spec JSON).

Used for the tiny and embedded models (tests, demo, benchmarks); a team with its own classifier exports it the
same way: `torch.jit.save(torch.jit.script(model), "classifier.pt")` and a ClassifierSpec JSON beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fgs_common.wire import ClassifierOutput, ClassifierSpec


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with global pooling; forward returns (logits, embedding) for the hardness score."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, embedding_dim: int = 64):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.embed = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, embedding_dim), nn.ReLU()
        )
        self.head = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(self.features(x))
        return self.head(embedding), embedding


def export_classifier(model: nn.Module, directory: Path, spec: ClassifierSpec) -> tuple[Path, Path]:
    """Write `classifier.pt` (TorchScript) and `spec.json` to `directory`; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "classifier.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(archive))
    spec_path = directory / "spec.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    return archive, spec_path


def random_small_cnn(
    directory: Path, num_classes: int = 10, input_size: int = 32, seed: int = 0
) -> tuple[Path, ClassifierSpec]:
    """A random-weight SmallCNN exported to `directory` (for tests of the plumbing): archive path and spec."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes)
    spec = ClassifierSpec(num_classes=num_classes, input_size=input_size, output=ClassifierOutput.logits_embedding)
    archive, _ = export_classifier(model, directory, spec)
    return archive, spec
