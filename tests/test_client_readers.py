"""Dataset readers on mini datasets written in each layout: records, class names, groups, skipped files, prompts."""

from __future__ import annotations

import csv
import json

import pytest

from fgs_client.dataset_readers import DatasetError, read_dataset, read_prompts_file
from fgs_client.dataset_writer import ManifestRow, write_class_folders, write_manifest
from support.dataset_trees import make_nicopp_tree, write_image


def test_nicopp_folder_layout_counts_groups_and_prompts(tmp_path):
    make_nicopp_tree(tmp_path, {("cat", "autumn"): 3, ("cat", "dim"): 1, ("hot air balloon", "water"): 2})
    bad = tmp_path / "track_1/public_dg_0416/train/rock/cat/notes.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_text("not an image")
    truncated = tmp_path / "track_1/public_dg_0416/train/rock/cat/empty.jpg"
    truncated.write_bytes(b"")

    dataset = read_dataset("nico++", tmp_path)

    assert dataset.class_names == ["cat", "hot air balloon"]
    assert dataset.groups == ["autumn", "dim", "grass", "outdoor", "rock", "water"]
    counts = dataset.unit_counts()
    assert len(counts) == 12
    assert counts[(0, "autumn")] == 3 and counts[(0, "dim")] == 1 and counts[(1, "water")] == 2
    assert counts[(0, "rock")] == 0 and sum(counts.values()) == 6
    assert sorted(s.path.name for s in dataset.skipped) == ["empty.jpg", "notes.jpg"]
    assert dataset.prompt(1, "water") == "hot air balloon in water"
    image = next(im for im in dataset.images if im.class_index == 1)
    assert image.rel_path.startswith("track_1/public_dg_0416/train/water/hot air balloon/")
    assert dataset.layout.synthetic_dir(dataset, 0, "grass") == "track_1/public_dg_0416/train/grass/cat"


def test_nicopp_metadata_csv_takes_train_rows_only(tmp_path):
    rows = ["filename,y,a,split"]
    for i in range(4):
        write_image(tmp_path / "autumn" / "bear" / f"{i}.png", i)
        rows.append(f"autumn/bear/{i}.png,1,0,{0 if i < 3 else 2}")
    write_image(tmp_path / "water" / "airplane" / "0.png", 9)
    rows.append("water/airplane/0.png,0,5,0")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")

    dataset = read_dataset("nico++", tmp_path)

    assert len(dataset.class_names) == 60 and dataset.class_names[:2] == ["airplane", "bear"]
    counts = dataset.unit_counts()
    assert len(counts) == 360
    assert counts[(1, "autumn")] == 3 and counts[(0, "water")] == 1 and sum(counts.values()) == 4
    assert dataset.prompt(0, "water") == "airplane in water"


def test_imagenet_lt_split_file_with_class_names(tmp_path):
    lines = []
    for label, (wnid, n) in enumerate([("n01440764", 3), ("n01443537", 1)]):
        for i in range(n):
            write_image(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG", i, "JPEG")
            lines.append(f"train/{wnid}/{wnid}_{i}.JPEG {label}")
    lines.append("train/n01443537/missing.JPEG 1")
    (tmp_path / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")

    dataset = read_dataset("imagenet-lt", tmp_path)

    assert dataset.class_names == ["tench", "goldfish"]
    assert dataset.unit_counts() == {(0, None): 3, (1, None): 1}
    assert len(dataset.skipped) == 1 and dataset.skipped[0].path.name == "missing.JPEG"
    assert dataset.prompt(1, None) == "goldfish"
    assert dataset.layout.synthetic_dir(dataset, 1, None) == "train/n01443537"


def test_imagenet_lt_defaults_to_packaged_class_names(tmp_path):
    write_image(tmp_path / "train/a/0.JPEG", 0, "JPEG")
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/a/0.JPEG 1\n")
    dataset = read_dataset("imagenet-lt", tmp_path)
    assert len(dataset.class_names) == 1000
    assert dataset.class_names[1] == "goldfish Carassius auratus"


def test_imagefolder_with_groups_csv(tmp_path):
    root = tmp_path / "data"
    for cls, n in (("ant", 2), ("bee", 1)):
        for i in range(n):
            write_image(root / cls / f"{i}.png", i)
    (root / "bee" / "README").write_text("hello")
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\nant/0.png,day\nant/1.png,night\nbee/0.png,day\nbee/README,day\n")

    plain = read_dataset("imagefolder", root)
    grouped = read_dataset("imagefolder", root, groups_csv=groups)

    assert plain.class_names == ["ant", "bee"] and plain.groups is None
    assert plain.unit_counts() == {(0, None): 2, (1, None): 1}
    assert len(plain.skipped) == 1
    assert grouped.groups == ["day", "night"]
    assert grouped.unit_counts() == {(0, "day"): 1, (0, "night"): 1, (1, "day"): 1, (1, "night"): 0}
    assert grouped.prompt(1, "night") == "bee in night"


def test_a_prompt_template_or_a_prompts_file_replaces_the_readers_prompts(tmp_path):
    root = tmp_path / "data"
    for cls in ("apple", "banana"):
        write_image(root / cls / "0.png")
    templated = read_dataset("imagefolder", root, prompt_template="a photo of a {class_name}")
    assert [templated.prompt(c, None) for c in (0, 1)] == ["a photo of a apple", "a photo of a banana"]
    as_json = tmp_path / "prompts.json"
    as_json.write_text(json.dumps({"banana": "a handwritten digit one", "apple": "a handwritten digit zero"}))
    as_csv = tmp_path / "prompts.csv"
    as_csv.write_text("class,prompt\napple,a handwritten digit zero\nbanana,a handwritten digit one\n")
    for prompts in (as_json, as_csv):
        mapped = read_dataset("imagefolder", root, prompts_file=prompts)
        assert [mapped.prompt(c, None) for c in (0, 1)] == ["a handwritten digit zero", "a handwritten digit one"]


def test_a_prompts_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path):
    as_csv = tmp_path / "prompts.csv"
    as_csv.write_bytes("class,prompt\napple,a red apple\nbanana,a yellow banana\n".encode("utf-8-sig"))
    assert read_prompts_file(as_csv, ["apple", "banana"]) == ["a red apple", "a yellow banana"]


CRANES = ["kite", "crane", "bee", "crane"]  # ImageNet-LT: "crane" the bird (134) and the machine (517)


def test_a_prompts_file_keys_classes_that_share_a_name_by_index(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"kite": "a kite", "crane": "a crane", "bee": "a bee"}))
    with pytest.raises(DatasetError, match=r"more than one class.*crane \(classes 1, 3\)"):
        read_prompts_file(prompts, CRANES)
    prompts.write_text(json.dumps({"kite": "a kite", "1-crane": "a crane bird", "bee": "a bee", "3-crane": "a crane"}))
    assert read_prompts_file(prompts, CRANES) == ["a kite", "a crane bird", "a bee", "a crane"]


def test_class_folders_of_classes_that_share_a_name_are_apart_and_in_index_order(tmp_path):
    out, dest = tmp_path / "out", tmp_path / "dest"
    rows = []
    for index, name in enumerate(CRANES):
        write_image(out / f"img{index}.png")
        rows.append(ManifestRow(path=f"img{index}.png", class_index=index, class_name=name, group="", source="real"))
    write_manifest(out, rows)
    assert write_class_folders(out, dest) == 4
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == ["0-kite", "1-crane", "2-bee", "3-crane"]
    assert [p.name for p in (dest / "3-crane").iterdir()] == ["img3.png"]
    # and Hugging Face datasets' metadata.csv beside them, the paths relative to dest
    with open(dest / "metadata.csv", newline="") as handle:
        metadata = list(csv.DictReader(handle))
    assert [(r["file_name"], r["label"], r["class_name"], r["group"]) for r in metadata] == [
        ("0-kite/img0.png", "0", "0-kite", ""),
        ("1-crane/img1.png", "1", "1-crane", ""),  # the two cranes stay two labels, as the folders are
        ("2-bee/img2.png", "2", "2-bee", ""),
        ("3-crane/img3.png", "3", "3-crane", ""),
    ]
    features = json.loads((dest / "features.json").read_text())
    assert features["label"] == {"names": ["0-kite", "1-crane", "2-bee", "3-crane"], "_type": "ClassLabel"}


@pytest.mark.parametrize(
    ("template", "prompts", "message"),
    [
        ("a photo", None, "must contain {class_name}"),
        ("a {colour} {class_name}", None, "colour"),
        (None, '{"apple": "x"}', r"no prompt for \['banana'\]"),
        (None, '{"apple": "x", "banana": "y", "cherry": "z"}', r"no such class \['cherry'\]"),
        ("{class_name}", '{"apple": "x", "banana": "y"}', "not both"),
    ],
)
def test_prompt_options_that_do_not_fit_the_dataset_are_refused(tmp_path, template, prompts, message):
    root = tmp_path / "data"
    for cls in ("apple", "banana"):
        write_image(root / cls / "0.png")
    prompts_file = None
    if prompts is not None:
        prompts_file = tmp_path / "prompts.json"
        prompts_file.write_text(prompts)
    with pytest.raises(DatasetError, match=message):
        read_dataset("imagefolder", root, prompt_template=template, prompts_file=prompts_file)


def test_digits_lt_layout(tmp_path):
    for digit, n in (("0", 3), ("1", 1)):
        for i in range(n):
            write_image(tmp_path / "train" / digit / f"{i}.png", i)
        write_image(tmp_path / "test" / digit / "0.png", 7)
    (tmp_path / "digits_lt.json").write_text(
        json.dumps({"classes": ["0", "1"], "prompts": ["a handwritten digit 0", "a handwritten digit 1"]})
    )

    dataset = read_dataset("digits-lt", tmp_path)

    assert dataset.class_names == ["0", "1"]
    assert dataset.unit_counts() == {(0, None): 3, (1, None): 1}
    assert dataset.prompt(1, None) == "a handwritten digit 1"
    assert dataset.layout.synthetic_dir(dataset, 0, None) == "train/0"
    assert {rel for _, rel in dataset.layout.passthrough} == {"digits_lt.json", "test/0/0.png", "test/1/0.png"}


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("nico++", tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        read_dataset("cifar", tmp_path)
    with pytest.raises(DatasetError, match="neither metadata.csv nor"):
        read_dataset("nico++", tmp_path)
    with pytest.raises(DatasetError, match="ImageNet_LT_train.txt"):
        read_dataset("imagenet-lt", tmp_path)
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/x.JPEG 5000\n")
    with pytest.raises(DatasetError, match="label 5000 outside"):
        read_dataset("imagenet-lt", tmp_path)
    with pytest.raises(DatasetError, match="digits_lt.json"):
        read_dataset("digits-lt", tmp_path)


def test_digits_lt_as_the_project_builds_it(tmp_path):
    from fgs_client.digits_lt import CLASS_NAMES, TRAIN_COUNTS, build_digits_lt

    build_digits_lt(tmp_path / "digits")
    dataset = read_dataset("digits-lt", tmp_path / "digits")
    assert dataset.class_names == list(CLASS_NAMES)
    assert [dataset.unit_counts()[(c, None)] for c in range(10)] == list(TRAIN_COUNTS)
    assert dataset.prompt(7, None) == "a handwritten digit seven"
    assert dataset.skipped == []
    assert all(im.rel_path.startswith(f"train/{CLASS_NAMES[im.class_index]}/") for im in dataset.images)


@pytest.mark.stack  # a fresh interpreter
def test_client_core_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, fgs_client.cli, fgs_client.http_client, fgs_client.balance_runner, fgs_client.contact_sheet, "
        "fgs_client.dataset_readers, fgs_client.balance_planner, fgs_client.dataset_writer; "
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, sorted(m for m in sys.modules if "
        "'torch' in m)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
