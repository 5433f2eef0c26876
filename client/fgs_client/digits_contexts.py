"""Digits-Contexts: NICO++ in miniature, handwritten digits drawn in NICO++'s six contexts, with group shift.

NICO++ (paper section 3, Table 1) has 60 classes x 6 contexts; its training groups run from 811 images down to
0, each class concentrated in a few contexts, so a classifier can learn the context as a shortcut and its
worst group suffers. This miniature has the same shape at a size this project's CPU tests can run:

- classes: scikit-learn's digits `zero` .. `nine` (`fgs_client.digits_lt.CLASS_NAMES`);
- contexts: NICO++'s names and order (`client/fgs_client/data/nicopp_contexts.txt`), each a background drawn by
  `draw_in_context` (autumn: warm leaves; dim: dark and low contrast; grass: green blades; outdoor: sky gradient;
  rock: grey grain; water: blue ripples), recognisable by eye and by a classifier;
- **train**, group-imbalanced with a spurious correlation: class c has `TRAIN_PROFILE` = 24, 8, 3, 1, 0, 0
  images in contexts `train_contexts(c)` (its main context is CONTEXTS[c % 6], so every context is the main one
  of one or two classes); 20 of the 60 groups are empty, as NICO++'s smallest groups are (the paper balances
  every group to its largest, 811; here 24);
- **validation** and **test**: group-balanced, `VALIDATION_PER_GROUP` = 6 and `TEST_PER_GROUP` = 10 digits in
  every class x context group, disjoint. Every choice is made on validation, test is read once;
- **generator**: every other digit (42 to 51 per class). Only the `fgs-digits-contexts` model is trained on these,
  drawn in every context; no train, validation or test digit is among them.

Each digit is drawn once, in one context. Split per class, seeded (`SPLIT_SEED`), as `fgs_client.digits_lt`.
Layout written by `build_digits_contexts(root)`: NICO++'s released one, so the `nico++` reader reads it as is:
`root/track_1/public_dg_0416/train/<context>/<class>/<index>.png`, `root/track_1/dg_label_id_mapping.json`,
plus `root/validation/<context>/<class>/` and `root/test/<context>/<class>/` (which the reader does not see) and
`root/digits_contexts.json` (classes, contexts, prompt form, counts per group, seed, every split's indices).
No torch here: numpy, Pillow and scikit-learn (imported where it is needed) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fgs_client.dataset_readers import NICOPP_MAPPING, NICOPP_TRAIN_DIR, packaged_lines
from fgs_client.digits_lt import CLASS_NAMES, IMAGE_SIZE, load_digit_arrays, upscaled_ink

CONTEXTS = tuple(packaged_lines("nicopp_contexts.txt"))  # autumn, dim, grass, outdoor, rock, water
SPLIT_SEED = 0
# Train images per class in its contexts, most to fewest (train_contexts(c)): 24 : 1 inside a class, 20 empty groups.
TRAIN_PROFILE = (24, 8, 3, 1, 0, 0)
VALIDATION_PER_GROUP = 6
TEST_PER_GROUP = 10
METADATA_FILE = "digits_contexts.json"
PROMPT_TEMPLATE = "{class_name} in {group}"  # the nico++ reader's prompt form (NICO++ prompts, paper App. J.2)


def train_contexts(class_index: int) -> tuple[str, ...]:
    """Class c's contexts in the order of TRAIN_PROFILE: main context CONTEXTS[c % 6], then offsets 1, 3, 4, and
    the two empty ones (offsets 2 and 5)."""
    return tuple(CONTEXTS[(class_index + offset) % len(CONTEXTS)] for offset in (0, 1, 3, 4, 2, 5))


def train_count(class_index: int, context: str) -> int:
    return TRAIN_PROFILE[train_contexts(class_index).index(context)]


# ---------------------------------------------------------------- drawing


def _blobs(canvas: np.ndarray, rng: np.random.Generator, count: int, radius: tuple[float, float], colours) -> None:
    """Soft elliptical blobs of the given colours, in place ([32, 32, 3] in [0, 1])."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(-2, IMAGE_SIZE + 2, 2)
        ry, rx = rng.uniform(*radius, 2)
        mask = np.clip(1.5 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0.0, 1.0)[..., None]
        colour = np.asarray(colours[rng.integers(len(colours))], np.float32) + rng.normal(0, 0.04, 3)
        canvas[:] = canvas * (1 - mask) + np.clip(colour, 0, 1) * mask


def context_background(context: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random background of `context` ([32, 32, 3] in [0, 1]) and the ink colour digits are drawn in there."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    jitter = rng.normal(0, 0.03, 3).astype(np.float32)
    if context == "autumn":  # warm leaf colours: orange ground, red, yellow and brown leaves
        canvas = np.broadcast_to(np.array([0.85, 0.5, 0.15], np.float32) + jitter, (n, n, 3)).copy()
        _blobs(canvas, rng, 9, (2.5, 5.0), [(0.8, 0.2, 0.08), (0.95, 0.75, 0.2), (0.55, 0.3, 0.1), (0.9, 0.45, 0.1)])
        ink = np.array([0.12, 0.04, 0.02], np.float32)
    elif context == "dim":  # low light and low contrast: dark grey-blue, ink only a little lighter
        canvas = np.broadcast_to(np.array([0.14, 0.14, 0.19], np.float32) + jitter / 2, (n, n, 3)).copy()
        canvas += rng.normal(0, 0.02, (n, n, 1)).astype(np.float32)
        ink = np.array([0.42, 0.42, 0.47], np.float32)
    elif context == "grass":  # green with darker and lighter vertical blades
        canvas = np.broadcast_to(np.array([0.25, 0.55, 0.18], np.float32) + jitter, (n, n, 3)).copy()
        image = Image.fromarray(np.zeros((n, n), np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y = rng.uniform(0, n, 2)
            draw.line((x, y, x + rng.uniform(-2, 2), y - rng.uniform(4, 10)), fill=int(rng.integers(60, 255)))
        blades = np.asarray(image, np.float32)[..., None] / 255.0
        shade = np.where(rng.random((n, n, 1)) < 0.5, -0.15, 0.2).astype(np.float32)
        canvas += blades * shade * np.array([0.6, 1.0, 0.4], np.float32)
        ink = np.array([0.05, 0.12, 0.03], np.float32)
    elif context == "outdoor":  # a sky gradient, deep blue at the top to pale at the horizon, a cloud or two
        t = (yy / (n - 1))[..., None]
        top = np.array([0.3, 0.55, 0.92], np.float32) + jitter
        horizon = np.array([0.85, 0.92, 0.98], np.float32)
        canvas = top * (1 - t) + horizon * t
        _blobs(canvas, rng, int(rng.integers(1, 3)), (2.0, 6.0), [(0.97, 0.97, 0.97)])
        ink = np.array([0.08, 0.08, 0.14], np.float32)
    elif context == "rock":  # grey grain
        grain = rng.normal(0, 0.5, (n // 2, n // 2)).astype(np.float32)
        grain = np.asarray(Image.fromarray(grain).resize((n, n), Image.BILINEAR))[..., None]
        fine = rng.normal(0, 0.06, (n, n, 1)).astype(np.float32)
        canvas = 0.55 + jitter.mean() + 0.12 * grain + fine + np.zeros((n, n, 3), np.float32)
        ink = np.array([0.1, 0.1, 0.1], np.float32)
    elif context == "water":  # blue with horizontal ripples; light ink
        phase = rng.uniform(0, 2 * np.pi)
        wavelength = rng.uniform(4.0, 6.0)
        ripple = np.sin(2 * np.pi * yy / wavelength + phase + 0.8 * np.sin(2 * np.pi * xx / 16.0 + phase))
        canvas = np.array([0.1, 0.35, 0.68], np.float32) + jitter + 0.1 * ripple[..., None] * np.array([1, 1, 0.6])
        ink = np.array([0.92, 0.96, 1.0], np.float32)
    else:
        raise ValueError(f"unknown context {context!r}; contexts are {', '.join(CONTEXTS)}")
    return np.clip(canvas, 0.0, 1.0).astype(np.float32), ink


def draw_in_context(ink: np.ndarray, context: str, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 ink map (0 background .. 1 ink) drawn in `context`: an RGB image [32, 32, 3] in [0, 1]."""
    canvas, ink_colour = context_background(context, rng)
    alpha = (
        np.asarray(
            Image.fromarray(np.round(255 * np.clip(ink, 0, 1)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.3)),
            np.float32,
        )[..., None]
        / 255.0
    )
    return canvas * (1.0 - alpha) + ink_colour * alpha


def to_image(array: np.ndarray) -> Image.Image:
    """[32, 32, 3] in [0, 1] -> RGB PIL image."""
    return Image.fromarray(np.round(255.0 * np.clip(array, 0.0, 1.0)).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------- the split


@dataclass(frozen=True)
class ContextsSplit:
    """Each part as (load_digits index, context) pairs; the indices of the four parts are disjoint."""

    generator: tuple[int, ...]
    train: tuple[tuple[int, str], ...]
    validation: tuple[tuple[int, str], ...]
    test: tuple[tuple[int, str], ...]


def contexts_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> ContextsSplit:
    """Per class, of a seeded permutation: validation (6 per context), test (10 per context), train (TRAIN_PROFILE
    over train_contexts(c)), the rest to the generator."""
    rng = np.random.default_rng(seed)
    generator: list[int] = []
    train: list[tuple[int, str]] = []
    validation: list[tuple[int, str]] = []
    test: list[tuple[int, str]] = []
    for class_index in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == class_index)).tolist()
        for part, per_group in ((validation, VALIDATION_PER_GROUP), (test, TEST_PER_GROUP)):
            for context in CONTEXTS:
                part.extend((members.pop(0), context) for _ in range(per_group))
        for context, count in zip(train_contexts(class_index), TRAIN_PROFILE, strict=True):
            train.extend((members.pop(0), context) for _ in range(count))
        generator.extend(members)
    return ContextsSplit(
        generator=tuple(sorted(generator)),
        train=tuple(sorted(train)),
        validation=tuple(sorted(validation)),
        test=tuple(sorted(test)),
    )


def generator_indices(seed: int = SPLIT_SEED) -> tuple[int, ...]:
    """load_digits indices the `fgs-digits-contexts` generator is trained on (disjoint from the miniature)."""
    _, labels = load_digit_arrays()
    return contexts_split(labels, seed).generator


def _image_rng(seed: int, index: int, context: str) -> np.random.Generator:
    """One generator per (digit, context): an image does not depend on which others were drawn before it."""
    return np.random.default_rng([seed, index, CONTEXTS.index(context)])


def build_digits_contexts(root: Path, seed: int = SPLIT_SEED) -> Path:
    """Write the miniature under `root` (NICO++ layout for train, validation/ and test/ beside it, the JSON);
    deterministic for a given seed."""
    root = Path(root)
    digits, labels = load_digit_arrays()
    split = contexts_split(labels, seed)
    places = {"train": f"{NICOPP_TRAIN_DIR}", "validation": "validation", "test": "test"}
    for part, members in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        for index, context in members:
            folder = root / places[part] / context / CLASS_NAMES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            image = draw_in_context(upscaled_ink(digits[index]), context, _image_rng(seed, index, context))
            to_image(image).save(folder / f"{index:04d}.png")
    (root / NICOPP_MAPPING).write_text(json.dumps({name: i for i, name in enumerate(CLASS_NAMES)}, indent=1))

    def group_counts(members) -> dict[str, dict[str, int]]:
        counts = {name: dict.fromkeys(CONTEXTS, 0) for name in CLASS_NAMES}
        for index, context in members:
            counts[CLASS_NAMES[labels[index]]][context] += 1
        return counts

    train_counts = group_counts(split.train)
    metadata = {
        "name": "digits-contexts",
        "source": "sklearn.datasets.load_digits (8x8, upscaled bicubic to 32x32), drawn in NICO++'s contexts "
        "(fgs_client.digits_contexts.draw_in_context)",
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "class_names": list(CLASS_NAMES),
        "contexts": list(CONTEXTS),
        "prompt_template": PROMPT_TEMPLATE,
        "layout": {
            "train": NICOPP_TRAIN_DIR,
            "label_mapping": NICOPP_MAPPING,
            "validation": "validation",
            "test": "test",
            "file": "<context>/<class>/<load_digits index>.png",
        },
        "train_profile": list(TRAIN_PROFILE),
        "train_contexts": {name: list(train_contexts(c)) for c, name in enumerate(CLASS_NAMES)},
        "train_counts": train_counts,
        "largest_group": max(max(row.values()) for row in train_counts.values()),
        "empty_groups": [f"{name}/{ctx}" for name, row in train_counts.items() for ctx, n in row.items() if n == 0],
        "validation_per_group": VALIDATION_PER_GROUP,
        "test_per_group": TEST_PER_GROUP,
        "evaluation_protocol": "choose every setting on validation (worst-group accuracy); read test once, for a "
        "comparison declared first",
        "indices": {
            "generator": list(split.generator),
            "train": [[index, context] for index, context in split.train],
            "validation": [[index, context] for index, context in split.validation],
            "test": [[index, context] for index, context in split.test],
        },
    }
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    return root


def read_held_out(root: Path, part: str) -> list[tuple[Path, int, str]]:
    """The validation or test split of a built miniature as (file, class index, context), in a fixed order."""
    base = Path(root) / part
    found = []
    for context in CONTEXTS:
        for class_index, name in enumerate(CLASS_NAMES):
            found.extend((path, class_index, context) for path in sorted((base / context / name).glob("*.png")))
    return found
