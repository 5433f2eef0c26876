"""The balance planner and `fgs-client balance --dry-run`: counts, targets, conditioning sources, job cutting."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fgs_client.balance_planner import (
    ConditioningSource,
    PlanError,
    UnitCounts,
    build_jobs,
    parse_target,
    plan_balance,
    read_counts_csv,
)
from fgs_client.cli import app
from fgs_client.dataset_readers import packaged_path, read_dataset
from support.dataset_trees import make_nicopp_tree

runner = CliRunner()


def counts(values: dict, groups=None, names=("a", "b", "c")) -> UnitCounts:
    return UnitCounts(class_names=list(names), groups=groups, counts=values)


def test_target_max_number_and_json():
    table = counts({(0, None): 10, (1, None): 4, (2, None): 0})

    by_max = plan_balance(table, "max", images_per_job=4)
    assert [e.to_add for e in by_max.entries] == [0, 6, 10]
    assert by_max.total_to_add == 16 and by_max.job_count == 0 + 2 + 3

    by_number = plan_balance(table, 7)
    assert [e.after for e in by_number.entries] == [10, 7, 7]  # never removes images

    by_json = plan_balance(table, parse_target('{"b": 5, "2": 3}'))
    assert [e.to_add for e in by_json.entries] == [0, 1, 3]


def test_target_json_errors_follow_imbalanced_learn():
    table = counts({(0, None): 10, (1, None): 4, (2, None): 0})
    with pytest.raises(PlanError, match="below its 10 real images"):
        plan_balance(table, {"a": 5})
    with pytest.raises(PlanError, match="no unit of this dataset"):
        plan_balance(table, {"zebra": 5})
    with pytest.raises(PlanError, match="JSON"):
        parse_target("{not json")


@pytest.mark.parametrize(
    ("text", "after"),
    [
        ("not majority", [10, 10, 10]),
        ("auto", [10, 10, 10]),
        ("all", [10, 10, 10]),
        ("minority", [10, 4, 10]),  # only the smallest class
        ("not minority", [10, 10, 0]),  # every class but the smallest
        ("0.5", [10, 5, 5]),  # a ratio of the largest class's count
        ("0.25", [10, 4, 3]),  # ceil(2.5); never removes images
    ],
)
def test_target_accepts_imbalanced_learns_strategy_forms(text, after):
    table = counts({(0, None): 10, (1, None): 4, (2, None): 0})
    assert [e.after for e in plan_balance(table, parse_target(text)).entries] == after


def test_a_target_ratio_outside_0_1_is_refused():
    with pytest.raises(PlanError, match=r"must lie in \(0, 1\]"):
        parse_target("1.5")


def test_conditioning_sources_for_empty_groups():
    table = counts({(0, "x"): 3, (0, "y"): 0, (1, "x"): 0, (1, "y"): 0}, groups=["x", "y"], names=("a", "b"))
    plan = plan_balance(table, "max")
    sources = {(e.class_index, e.group): e.conditioning for e in plan.entries}
    assert sources == {
        (0, "x"): ConditioningSource.own,
        (0, "y"): ConditioningSource.other_groups,  # paper J.2: same class, other contexts
        (1, "x"): ConditioningSource.text,
        (1, "y"): ConditioningSource.text,
    }
    assert [e.to_add for e in plan.entries] == [0, 3, 3, 3]


def test_jobs_are_deterministic_and_empty_groups_use_other_contexts(tmp_path):
    make_nicopp_tree(tmp_path, {("cat", "autumn"): 3, ("cat", "dim"): 1, ("dog", "water"): 2})
    dataset = read_dataset("nico++", tmp_path)
    plan = plan_balance(UnitCounts.from_dataset(dataset), "max", images_per_job=2)

    slots = build_jobs(plan, dataset, seed=7)
    again = build_jobs(plan, dataset, seed=7)
    other = build_jobs(plan, dataset, seed=8)

    assert sum(s.num_images for s in slots) == plan.total_to_add == 12 * 3 - 6
    assert len(slots) == plan.job_count
    assert [(s.key, s.seed, s.conditioning) for s in slots] == [(s.key, s.seed, s.conditioning) for s in again]
    assert [s.seed for s in slots] != [s.seed for s in other]
    assert len({s.seed for s in slots}) == len(slots)
    for slot in slots:
        assert len(slot.conditioning) == slot.num_images
        assert all(im.class_index == slot.entry.class_index for im in slot.conditioning)
        if slot.entry.before > 0:
            assert all(im.group == slot.entry.group for im in slot.conditioning)
        else:
            assert all(im.group != slot.entry.group for im in slot.conditioning)
    grass_cat = next(s for s in slots if s.entry.class_name == "cat" and s.entry.group == "grass")
    assert grass_cat.prompt == "cat in grass"


def test_imagenet_lt_dry_run_from_counts_prints_total():
    result = runner.invoke(
        app,
        ["balance", "--dataset", "imagenet-lt", "--counts", "builtin", "--target", "1300", "--dry-run"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "1,000 classes: 115,846 real images, 1,184,154 images to add" in result.output
    assert "148,459 jobs" in result.output  # sum over classes of ceil(to_add / 8)
    plan = plan_balance(read_counts_csv(packaged_path("imagenet_lt_train_counts.csv")), 1300)
    assert "goldfish Carassius auratus" in result.output and "1,300" in result.output
    assert min(e.to_add for e in plan.entries) == 20 and max(e.to_add for e in plan.entries) == 1295


def test_nicopp_dry_run_prints_groups_table(tmp_path):
    make_nicopp_tree(tmp_path / "nico", {("cat", "autumn"): 3, ("dog", "water"): 1})
    result = runner.invoke(
        app,
        ["balance", "--dataset", "nico++", "--root", str(tmp_path / "nico"), "--dry-run", "--images-per-job", "2"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "12 groups: 4 real images, 32 images to add in 21 jobs" in result.output
    assert "grass" in result.output and "class" in result.output


def test_counts_csv_with_groups(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("class,group,count\ncat,autumn,5\ncat,dim,1\ndog,dim,2\n")
    table = read_counts_csv(path)
    assert table.groups == ["autumn", "dim"]
    assert table.counts == {(0, "autumn"): 5, (0, "dim"): 1, (1, "dim"): 2, (1, "autumn"): 0}
    assert plan_balance(table, "max").total_to_add == 20 - 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cifar", "--root", "."], "cifar"),
        (["--dataset", "nico++", "--root", "/does/not/exist", "--dry-run"], "does not exist"),
        (["--dataset", "nico++", "--dry-run"], "--root is required"),
        (["--dataset", "imagenet-lt", "--counts", "nope.csv", "--dry-run"], "cannot read counts file"),
        (["--dataset", "imagenet-lt", "--counts", "x.csv"], "add --dry-run"),
    ],
)
def test_bad_cli_input_exits_nonzero_with_message(args, message):
    result = runner.invoke(app, ["balance", *args], terminal_width=200)
    assert result.exit_code == 2
    assert message in result.output


def test_the_digits_lt_command_writes_an_imagefolder_to_try_fgs_on(tmp_path):
    out = tmp_path / "digits-lt"
    result = runner.invoke(app, ["digits-lt", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # line breaks folded: the CLI's console wraps at the terminal's width (fixed at import when COLUMNS is set
    # then), and a long tmp path (a pytest-xdist worker's) moves where they fall
    said = " ".join(result.output.split())
    assert "185 images (zero 60, one 41" in said and "nine 2)" in said
    train = read_dataset("imagefolder", out / "train")
    assert len(train.images) == 185 and train.class_names == sorted(train.class_names)
    assert len(read_dataset("imagefolder", out / "test").images) == 400
    again = runner.invoke(app, ["digits-lt", "--out", str(out)])
    assert again.exit_code == 0 and "already holds Digits-LT" in " ".join(again.output.split())
