"""A two-class TorchScript-able classifier on 8x8 RGB that returns (logits, embedding)."""

from __future__ import annotations

import torch


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(3 * 8 * 8, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x.flatten(1))
        return self.head(embedding), embedding


# Grey levels of the three classes of `make_brightness_set`, and their values under mean 0.5, std 0.5.
BRIGHTNESS_CLASSES = {"dark": 0.1, "grey": 0.5, "light": 0.9}


class BrightnessClassifier(torch.nn.Module):
    """Tells the grey levels of BRIGHTNESS_CLASSES apart after normalisation with the mean and std it was "trained"
    with (0.5 and 0.5 unless told): logit k is -(m - c_k)^2 up to a term common to all classes, m the mean input
    value, c_k class k's normalised level. It knows its classes in `order`; fed pixels normalised otherwise, it
    takes some or most images for another class."""

    def __init__(self, order: list[str], size: int = 8, trained_mean: float = 0.5, trained_std: float = 0.5):
        super().__init__()
        centers = torch.tensor([(BRIGHTNESS_CLASSES[name] - trained_mean) / trained_std for name in order])
        inputs = 3 * size * size
        self.head = torch.nn.Linear(inputs, len(order))
        with torch.no_grad():  # 2 c_k m - c_k^2, with m = sum(x) / inputs
            self.head.weight.copy_((2 * centers / inputs).unsqueeze(1).expand(-1, inputs))
            self.head.bias.copy_(-(centers**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def write_brightness_classifier(
    directory,
    order: list[str],
    mean: float = 0.5,
    std: float = 0.5,
    trained_mean: float = 0.5,
    trained_std: float = 0.5,
):
    """The BrightnessClassifier trained with `trained_mean`/`trained_std` as TorchScript, and a spec (class_names in
    `order`) that says `mean`/`std`; returns (archive, spec)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "brightness.pt"
    torch.jit.script(BrightnessClassifier(order, trained_mean=trained_mean, trained_std=trained_std).eval()).save(
        str(archive)
    )
    spec = directory / "brightness.json"
    spec.write_text(
        json.dumps({"num_classes": len(order), "class_names": order, "input_size": 8, "mean": [mean], "std": [std]})
    )
    return archive, spec


def make_brightness_set(root, counts: dict[str, int]) -> None:
    """An ImageFolder `<root>/<class>/<i>.png` of flat 8x8 images at each class's grey level (with a little noise)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in counts.items():
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(BRIGHTNESS_CLASSES[name] * 255 + rng.normal(0, 4, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
