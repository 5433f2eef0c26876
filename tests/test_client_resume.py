"""Crash safety on files and state, without a server: atomic PNG writes, leftovers, the state file, early refusals."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from typer.testing import CliRunner

from fgs_client.balance_state import STATE_NAME, BalanceState, StateConflict
from fgs_client.cli import app
from fgs_client.dataset_writer import MANIFEST_COLUMNS, generation_columns, remove_temporary_files, write_png_atomic
from fgs_common.wire import STORED, GenerateRequest, GenerationParams
from support.dataset_trees import make_nicopp_tree

runner = CliRunner()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_write_png_atomic_refuses_truncated_and_non_png(tmp_path):
    data = png_bytes()
    write_png_atomic(tmp_path / "a" / "ok.png", data)
    with Image.open(tmp_path / "a" / "ok.png") as image:
        assert image.size == (16, 16)
    with pytest.raises(OSError):
        write_png_atomic(tmp_path / "a" / "cut.png", data[: len(data) // 2])
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with pytest.raises(ValueError, match="expected a PNG"):
        write_png_atomic(tmp_path / "a" / "j.png", jpeg.getvalue())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ok.png"]


def test_remove_temporary_files_keeps_finished_ones(tmp_path):
    (tmp_path / "fgs_c0_j00000_000.png").write_bytes(b"x")
    (tmp_path / ".fgs_c0_j00000_001.png.tmp-4242").write_bytes(b"half")
    assert remove_temporary_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["fgs_c0_j00000_000.png"]


def test_state_binds_one_plan_and_commits_chunks_whole(tmp_path):
    state = BalanceState(tmp_path / STATE_NAME)
    state.bind_plan("plan-a", [("0/0", 0, 4), ("0/1", 1, 4), ("1/0", 2, 2)], chunk_size=2)
    state.bind_plan("plan-a", [("ignored", 0, 1)], chunk_size=2)  # same plan: a resume, nothing changes
    with pytest.raises(StateConflict, match="different plan"):
        state.bind_plan("plan-b", [], chunk_size=2)
    assert state.pending_chunks() == [0, 1]
    state.record_batch_submitted("batch-1", [("0/0", "job-1", "{}"), ("0/1", "job-2", "{}")])
    assert state.pending_chunks() == [1]
    assert [r.job_id for r in state.active(10)] == ["job-1", "job-2"]
    state.record_done("0/0", "job-1", [{"path": "x.png", "seed": 1}])
    state.record_failed("0/1", "boom")
    assert state.counts() == {"done": (1, 4), "failed": (1, 4), "pending": (1, 2)}
    assert state.reopen_failed() == {"0/1"}
    state.record_upload("ab" * 32, "img-1")
    state.close()
    # what another process sees after the close (or a kill) is the committed state
    reopened = BalanceState(tmp_path / STATE_NAME)
    assert [r.key for r in reopened.active(10)] == ["0/1"]
    assert reopened.rows("done")[0].results == [{"path": "x.png", "seed": 1}]
    assert reopened.uploaded_id("ab" * 32) == "img-1"
    reopened.close()


def test_cli_refuses_a_different_plan_in_the_same_out(tmp_path):
    make_nicopp_tree(tmp_path / "nico", {("cat", "autumn"): 2})
    out = tmp_path / "out"
    out.mkdir()
    state = BalanceState(out / STATE_NAME)
    state.bind_plan("someone-elses-plan", [], chunk_size=10)
    state.close()
    result = runner.invoke(
        app,
        [
            "balance",
            "--dataset",
            "nico++",
            "--root",
            str(tmp_path / "nico"),
            "--out",
            str(out),
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    assert result.exit_code == 2
    assert "different plan" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--criterion", "entropy"], "scores images with your classifier: give --classifier FILE"),
        (["--steps", "3", "--guidance-every", "5"], "must be at least guidance_every"),
        (["--classifier", "/no/such.pt", "--classifier-spec", "/no/spec.json"], "does not exist"),
        (["--dropout-p", "1.5"], "dropout_p"),
    ],
)
def test_cli_rejects_bad_generation_settings_before_any_work(tmp_path, extra, message):
    make_nicopp_tree(tmp_path / "nico", {("cat", "autumn"): 2})
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["balance", "--dataset", "nico++", "--root", str(tmp_path / "nico"), "--out", str(out), *extra],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_cli_refuses_out_inside_root(tmp_path):
    make_nicopp_tree(tmp_path / "nico", {("cat", "autumn"): 2})
    result = runner.invoke(
        app,
        [
            "balance",
            "--dataset",
            "nico++",
            "--root",
            str(tmp_path / "nico"),
            "--out",
            str(tmp_path / "nico" / "out"),
            "--url",
            "http://127.0.0.1:9",
        ],
    )
    assert result.exit_code == 2
    assert "outside the dataset root" in result.output


def test_status_of_missing_run(tmp_path):
    result = runner.invoke(app, ["status", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "holds no balance run" in result.output


def test_the_manifests_generation_columns_come_from_the_stored_request():
    stored = GenerateRequest(
        prompt="a bee", class_index=1, criterion="entropy", omega=0.05, gamma=2.0, dropout_p=0.5, classifier_id="c"
    ).model_dump_json()
    columns = generation_columns(GenerateRequest.model_validate_json(stored, context=STORED))
    assert columns == {"criterion": "entropy", "omega": "0.05", "gamma": "2.0", "dropout_p": "0.5"}
    assert set(columns) <= set(MANIFEST_COLUMNS) & set(GenerationParams.model_fields)


def test_each_request_names_the_group_its_job_fills(tmp_path):
    """What the gallery's group filter reads: a class x group run's requests carry their group."""
    from fgs_client.balance_options import BalanceOptions
    from fgs_client.balance_planner import UnitCounts, plan_balance
    from fgs_client.balance_runner import BalanceRun
    from fgs_client.dataset_readers import read_dataset
    from support.dataset_trees import write_image

    root = tmp_path / "data"
    for path in ("a/0.png", "a/1.png", "a/2.png", "b/0.png"):
        write_image(root / path)
    groups = tmp_path / "groups.csv"
    groups.write_text("path,group\na/0.png,grass\na/1.png,snow\na/2.png,grass\nb/0.png,snow\n")
    dataset = read_dataset("imagefolder", root, groups_csv=groups)
    plan = plan_balance(UnitCounts.from_dataset(dataset), "max", images_per_job=1)
    run = BalanceRun(None, dataset, tmp_path / "out", plan, BalanceOptions(text_only=True, show_progress=False))
    pairs = {(slot.entry.group, run.inputs.request(None, slot).group) for slot in run.slots}
    assert {given for given, _ in pairs} == {"grass", "snow"} and all(given == sent for given, sent in pairs)


def test_other_images_at_the_same_paths_are_another_plan(tmp_path):
    """The plan fingerprint (the state's binding and every Idempotency-Key) covers the conditioning images' bytes:
    a second dataset at the same paths neither resumes the first one's state nor gets its jobs back."""
    from fgs_client.balance_options import BalanceOptions
    from fgs_client.balance_planner import UnitCounts, plan_balance
    from fgs_client.balance_runner import BalanceRun
    from fgs_client.dataset_readers import read_dataset
    from support.dataset_trees import write_image

    def run_on(values: tuple[int, ...]) -> BalanceRun:
        root = tmp_path / "data"
        for index, value in enumerate(values):
            write_image(root / ("a" if index < 2 else "b") / f"{index}.png", value=value)
        dataset = read_dataset("imagefolder", root)
        plan = plan_balance(UnitCounts.from_dataset(dataset), "max", images_per_job=1)
        return BalanceRun(None, dataset, tmp_path / "out", plan, BalanceOptions(show_progress=False))

    first = run_on((1, 2, 3))
    assert run_on((1, 2, 3)).fingerprint == first.fingerprint  # the same bytes: the same plan (a resume)
    other = run_on((4, 5, 6))  # the same file names, other pixels
    assert [s.key for s in other.slots] == [s.key for s in first.slots]
    assert other.fingerprint != first.fingerprint
    state = BalanceState(tmp_path / STATE_NAME)
    first.bind(state)
    with pytest.raises(StateConflict, match="different plan"):
        other.bind(state)
    state.close()


def test_a_state_file_of_an_earlier_version_records_the_batches_its_jobs_name(tmp_path):
    state = BalanceState(tmp_path / STATE_NAME)
    state.bind_plan("plan", [("0/0", 0, 1), ("0/1", 1, 1), ("0/2", 2, 1)], chunk_size=3)
    state.record_batch_submitted("batch-1", [("0/0", "job-1", "{}"), ("0/1", "job-2", "{}")])
    state.record_batch_submitted(None, [("0/2", "job-3", "{}")])  # a retry an earlier version sent alone
    state._db.execute("DROP TABLE batches")  # what that version wrote: no table of batches
    state.close()
    state = BalanceState(tmp_path / STATE_NAME)
    assert state.batch_ids() == ["batch-1"]
    state.record_resubmitted("0/2", 1, "job-4", "batch-2")
    assert state.batch_ids() == ["batch-1", "batch-2"]
    assert [r.batch_id for r in state.rows()] == ["batch-1", "batch-1", "batch-2"]
    state.close()
