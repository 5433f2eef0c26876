"""Digits-LT: a small long-tailed classification benchmark cut from scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits` holds 1797 8x8 digits (174 to 183 per class). They are split once, seeded
(`SPLIT_SEED`), per class, into three disjoint parts:

- **validation** and **test**: 40 + 40 digits of every class (400 + 400, balanced), disjoint. Every choice of
  an experiment (settings, which variant is best) is made on validation; test is read once, for the comparison
  declared before it. 40 per class: one image is 2.5 points of a class's accuracy.
- **train** (long-tailed): `TRAIN_COUNTS` = 60, 41, 28, 19, 13, 9, 6, 4, 3, 2 for classes zero .. nine
  (185 images), an exponential profile with imbalance ratio 60 / 2 = 30.
- **generator**: everything else (38 to 98 per class, 812 in all). Only the `fgs-digits` diffusion model is
  trained on these; Digits-LT (train and test) never contains them, so the generator never saw a test digit.

Every digit lands in exactly one part, so validation + test are all real digits that are neither generator
nor train digits (the 80 held out per class, as before the validation split existed: the generator split, and
so the embedded model, did not change).
Shot groups, scaled from ImageNet-LT's (Many > 100, Medium 20-100, Few < 20 of at most 1280
images per class) to a largest class of 60: **Many** > 20 train images (zero, one, two), **Medium** 6-20
(three .. six), **Few** < 6 (seven, eight, nine).

Images are written in the target's *original style*: dark ink on a white background, grey, upscaled to 32x32
RGB. The generator is trained on the same kind of digits under random style transforms (see
`fgs_lab.digits_model_training`), so its world is broader than the target's.

Layout written by `build_digits_lt(root)`:
`root/{train,validation,test}/<class name>/<index>.png` (index = load_digits index) and
`root/digits_lt.json` (class names, prompts, counts, thresholds, seed and the indices of every split).
No torch here: numpy, Pillow and scikit-learn (imported where it is needed) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
SPLIT_SEED = 0
HELD_OUT_PER_CLASS = 80  # per class, split into validation and test
VALIDATION_PER_CLASS = 40
# Long-tailed train counts per class: round(60 * (2 / 60) ** (c / 9)) for c = 0 .. 9.
TRAIN_COUNTS = (60, 41, 28, 19, 13, 9, 6, 4, 3, 2)
# Shot groups by train count: Many > MANY_ABOVE, Few < FEW_BELOW, Medium in between (inclusive).
MANY_ABOVE = 20
FEW_BELOW = 6
METADATA_FILE = "digits_lt.json"


def class_prompt(class_name: str) -> str:
    """The text prompt of a class, e.g. "a handwritten digit seven"."""
    return f"a handwritten digit {class_name}"


def shot_group(train_count: int) -> str:
    """ "many", "medium" or "few" for a class with `train_count` training images."""
    if train_count > MANY_ABOVE:
        return "many"
    if train_count < FEW_BELOW:
        return "few"
    return "medium"


@dataclass(frozen=True)
class DigitsSplit:
    """Indices into `load_digits()` of each part; disjoint, together all 1797 digits."""

    generator: tuple[int, ...]
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images [1797, 8, 8] with values 0 (paper) .. 16 (ink), labels [1797]."""
    from sklearn.datasets import load_digits  # the `train`/`dev` extras; keep the client importable without it

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def digits_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> DigitsSplit:
    """Split per class, seeded: of a permutation, the first 40 go to validation, the next 40 to test, the next
    TRAIN_COUNTS[c] to train, the rest to the generator."""
    rng = np.random.default_rng(seed)
    generator: list[int] = []
    train: list[int] = []
    validation: list[int] = []
    test: list[int] = []
    for class_index in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == class_index))
        validation += members[:VALIDATION_PER_CLASS].tolist()
        test += members[VALIDATION_PER_CLASS:HELD_OUT_PER_CLASS].tolist()
        train += members[HELD_OUT_PER_CLASS : HELD_OUT_PER_CLASS + TRAIN_COUNTS[class_index]].tolist()
        generator += members[HELD_OUT_PER_CLASS + TRAIN_COUNTS[class_index] :].tolist()
    return DigitsSplit(*(tuple(sorted(part)) for part in (generator, train, validation, test)))


def generator_indices(seed: int = SPLIT_SEED) -> tuple[int, ...]:
    """Indices into `load_digits()` that the `fgs-digits` generator is trained on (disjoint from Digits-LT)."""
    _, labels = load_digit_arrays()
    return digits_split(labels, seed).generator


def ink_to_original_style(ink: np.ndarray) -> Image.Image:
    """An ink map ([H, W], 0 = paper .. 1 = ink, any size) as the original style: dark grey ink on white, 32x32 RGB."""
    grey = Image.fromarray(np.round(255.0 * (1.0 - np.clip(ink, 0.0, 1.0))).astype(np.uint8), mode="L")
    if grey.size != (IMAGE_SIZE, IMAGE_SIZE):
        grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return grey.convert("RGB")


def upscaled_ink(digit: np.ndarray) -> np.ndarray:
    """An 8x8 load_digits image (0 .. 16) as a 32x32 ink map in [0, 1] (bicubic)."""
    small = Image.fromarray(np.round(digit * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0


def original_style_image(digit: np.ndarray) -> Image.Image:
    """An 8x8 load_digits image as Digits-LT stores it: 32x32 RGB, dark ink on white."""
    return ink_to_original_style(upscaled_ink(digit))


def build_digits_lt(root: Path, seed: int = SPLIT_SEED) -> Path:
    """Write Digits-LT under `root` (train/, validation/, test/, digits_lt.json); deterministic for a given seed."""
    root = Path(root)
    images, labels = load_digit_arrays()
    split = digits_split(labels, seed)
    for part, indices in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        for index in indices:
            folder = root / part / CLASS_NAMES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            original_style_image(images[index]).save(folder / f"{index:04d}.png")
    train_counts = [int(np.sum(labels[list(split.train)] == c)) for c in range(len(CLASS_NAMES))]
    validation_counts = [int(np.sum(labels[list(split.validation)] == c)) for c in range(len(CLASS_NAMES))]
    test_counts = [int(np.sum(labels[list(split.test)] == c)) for c in range(len(CLASS_NAMES))]
    metadata = {
        "name": "digits-lt",
        "source": "sklearn.datasets.load_digits (8x8, upscaled bicubic to 32x32, dark ink on white, RGB)",
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "class_names": list(CLASS_NAMES),
        "prompts": [class_prompt(name) for name in CLASS_NAMES],
        "train_counts": train_counts,
        "validation_counts": validation_counts,
        "test_counts": test_counts,
        "evaluation_protocol": "choose every setting on validation; read test once, for a comparison declared first",
        "imbalance_ratio": max(train_counts) / min(train_counts),
        "shot_thresholds": {
            "many": f"more than {MANY_ABOVE} train images",
            "medium": f"{FEW_BELOW} to {MANY_ABOVE} train images",
            "few": f"fewer than {FEW_BELOW} train images",
            "many_above": MANY_ABOVE,
            "few_below": FEW_BELOW,
        },
        "shot_groups": {name: shot_group(count) for name, count in zip(CLASS_NAMES, train_counts, strict=False)},
        "indices": {
            "generator": list(split.generator),
            "train": list(split.train),
            "validation": list(split.validation),
            "test": list(split.test),
        },
    }
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return root
