"""The paper's NICO++ loop on the Digits-Contexts miniature, end to end: `fgs-client balance --dataset nico++
--preset paper-nicopp` against the live stack (uvicorn + workers on the tiny model, steps reduced), with the
feedback classifier the preset's entropy criterion needs. Empty groups are conditioned on the same class's
images from other groups (paper App. J.2), prompts are "class in context", the manifest's group column is right.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fgs_client.dataset_readers import read_dataset
from fgs_client.digits_contexts import CONTEXTS, build_digits_contexts
from support.live_calls import client_process as cli

REDUCED = ["--steps", "2", "--guidance-every", "1", "--images-per-job", "4", "--no-progress"]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_digits_contexts(tmp_path_factory.mktemp("nicopp-mini") / "mini")


def run_cli(*args: str, key: str, url: str, timeout: float = 300) -> tuple[int, str]:
    process = cli(*args, key=key, url=url)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_balance_the_miniature_with_the_paper_nicopp_preset(live_stack, classifier_files, miniature, tmp_path):
    key, url = live_stack.keys["alpha"], live_stack.base_url
    archive, spec = classifier_files
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    common = ["balance", "--dataset", "nico++", "--root", str(miniature), "--preset", "paper-nicopp"]
    # --target 1: the 20 empty groups, one image each (the preset's own target is NICO++'s 811)
    code, output = run_cli(*common, "--target", "1", "--dry-run", key=key, url=url)
    assert code == 0, output
    assert "60 groups: 360 real images, 20 images to add in 20 jobs" in output
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if "│" in line]
    plan_rows = [row for row in cells if len(row) == 7 and row[1] in CONTEXTS]  # class, group, ..., prompt
    assert len(plan_rows) == 60 and "seven in water" in output and "entropy" in output
    assert sum(row[5] == "other groups" for row in plan_rows) == 20  # the empty groups (paper App. J.2)
    assert all(row[6] == f"{row[0]} in {row[1]}" for row in plan_rows)

    out = tmp_path / "balanced"
    code, output = run_cli(
        *common,
        "--target",
        "1",
        "--out",
        str(out),
        *REDUCED,
        "--classifier",
        str(archive),
        "--classifier-spec",
        str(tmp_path / "spec.json"),
        "--force",  # a random-weight classifier fails the pre-flight accuracy check on the user's images
        key=key,
        url=url,
        timeout=240,
    )
    assert code == 0, output

    source = read_dataset("nico++", miniature)
    empty = {(source.class_names[c], g) for (c, g), n in source.unit_counts().items() if n == 0}
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert len(rows) == 380 and Counter((r["class"], r["group"]) for r in synthetic) == dict.fromkeys(empty, 1)
    real_by_digest = {hashlib.sha256(im.path.read_bytes()).hexdigest(): im for im in source.images}
    for row in rows:
        # the group column is the folder the file sits in (NICO++ layout: train/<context>/<class>/)
        context, class_name = Path(row["path"]).parts[-3:-1]
        assert (row["group"], row["class"]) == (context, class_name)
    for row in synthetic:
        assert row["prompt"] == f"{row['class']} in {row['group']}" and row["criterion"] == "entropy"
        with Image.open(out / row["path"]) as image:
            request = json.loads(image.text["fgs"])
        image = real_by_digest[request["conditioning_image_id"]]  # the real image this one was conditioned on
        # the same class, from another group (the empty group has none); the prompt names the empty group
        assert source.class_names[image.class_index] == row["class"] and image.group != row["group"]
        assert request["prompt"] == row["prompt"] and request["steps"] == 2
    dataset = read_dataset("nico++", out)  # the result is NICO++ again: every group now holds an image
    assert min(dataset.unit_counts().values()) == 1 and len(dataset.images) == 380
