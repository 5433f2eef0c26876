"""`fgs-client balance` end to end against the live stack (uvicorn + RQ workers on the tiny model).

Runs the real CLI in subprocesses, kills it with SIGKILL mid-run, and checks the files it leaves.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fgs_client.balance_runner import balance
from fgs_client.balance_state import STATE_NAME
from fgs_client.http_client import AuthenticationFailed, Client
from fgs_common.wire import GenerationParams
from support.dataset_trees import make_nicopp_tree, write_image
from support.live_calls import client_process as cli

FAST = ["--steps", "4", "--guidance-every", "2", "--images-per-job", "4", "--no-progress"]
WITH_PROGRESS = FAST[:-1]
# cat and dog have real images in some contexts only; bird only in one; 3 classes x 6 contexts, max group = 3
NICO_COUNTS = {("cat", "autumn"): 3, ("cat", "dim"): 1, ("dog", "water"): 2, ("dog", "rock"): 1, ("bird", "grass"): 1}
CONTEXTS = ["autumn", "dim", "grass", "outdoor", "rock", "water"]


def run_cli(*args: str, key: str, url: str, timeout: float = 300) -> tuple[int, str]:
    process = cli(*args, key=key, url=url)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def read_manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def check_balanced_nicopp(out: Path, target: int = 3) -> list[dict]:
    """Exact per-group counts, valid PNGs, no temporary files, manifest rows = files one to one."""
    train = out / "track_1/public_dg_0416/train"
    for context in CONTEXTS:
        for class_name in ("bird", "cat", "dog"):
            files = sorted((train / context / class_name).glob("*")) if (train / context / class_name).is_dir() else []
            assert len(files) == target, (context, class_name, files)
    leftovers = [p for p in out.rglob(".*") if p.name != STATE_NAME and not p.name.startswith(STATE_NAME)]
    assert leftovers == []
    synthetic_files = {p.relative_to(out).as_posix() for p in train.rglob("fgs_*.png")}
    assert len(synthetic_files) == 18 * target - sum(NICO_COUNTS.values())
    for rel in synthetic_files:
        with Image.open(out / rel) as image:
            assert image.format == "PNG"
            image.load()  # a truncated file raises here
    rows = read_manifest_rows(out)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths))
    assert {r["path"] for r in rows if r["source"] == "synthetic"} == synthetic_files
    real = {r["path"] for r in rows if r["source"] == "real"}
    index = train / "metadata.csv"  # Hugging Face datasets' index, in the folder that holds every image
    assert index.read_text().startswith("file_name,label,class_name,group,source")
    features = train / "features.json"  # beside it: label as a ClassLabel
    assert json.loads(features.read_text())["label"]["_type"] == "ClassLabel"
    assert real == {
        p.relative_to(out).as_posix()
        for p in train.rglob("*")
        if p.is_file() and not p.name.startswith("fgs_") and p not in (index, features)
    }
    by_group = Counter((r["class"], r["group"]) for r in rows)
    assert set(by_group.values()) == {target} and len(by_group) == 18
    for row in rows:
        if row["source"] == "synthetic":
            assert row["job_id"] and row["seed"] and row["criterion"] == "none"
            assert row["gamma"] == str(GenerationParams().gamma)
    assert (out / "track_1/dg_label_id_mapping.json").is_file()
    return rows


def tenant_job_ids(stack, tenant: str) -> set[str]:
    with stack.client(tenant) as client:
        return {job["job_id"] for job in client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}


def run_batches(stack, tenant: str, out: Path) -> dict[str, list[str]]:
    """The batches the run in `out` recorded, each with its job ids as the service's batch view lists them."""
    with sqlite3.connect(out / STATE_NAME) as db:
        batch_ids = [row[0] for row in db.execute("SELECT batch_id FROM batches ORDER BY rowid")]
    with stack.client(tenant) as client:
        return {batch_id: client.get(f"/v1/batches/{batch_id}").json()["job_ids"] for batch_id in batch_ids}


@pytest.fixture
def nico_root(tmp_path) -> Path:
    root = tmp_path / "nico"
    make_nicopp_tree(root, NICO_COUNTS)
    return root


def test_balance_nicopp_writes_exact_counts_and_manifest(live_stack, nico_root, tmp_path):
    out = tmp_path / "balanced"
    code, output = run_cli(
        "balance",
        "--dataset",
        "nico++",
        "--root",
        str(nico_root),
        "--out",
        str(out),
        *WITH_PROGRESS,
        key=live_stack.keys["alpha"],
        url=live_stack.base_url,
    )
    assert code == 0, output
    assert "46/46 synthetic images" in output
    assert "generating" in output and "img/s" in output and "0 failed" in output  # the progress bar's last state
    rows = check_balanced_nicopp(out)
    # empty groups of a class with real images are conditioned on that class's images elsewhere;
    # 17 groups need images, one job each
    assert len({r["job_id"] for r in rows if r["source"] == "synthetic"}) == 17
    # a rerun of a finished balance changes nothing and uploads/submits nothing
    code, output = run_cli(
        "balance",
        "--dataset",
        "nico++",
        "--root",
        str(nico_root),
        "--out",
        str(out),
        *FAST,
        key=live_stack.keys["alpha"],
        url=live_stack.base_url,
    )
    assert code == 0, output
    assert read_manifest_rows(out) == rows
    code, output = run_cli("status", "--out", str(out), key=live_stack.keys["alpha"], url=live_stack.base_url)
    assert code == 0 and "done" in output and "46" in output
    with sqlite3.connect(out / STATE_NAME) as db:
        batch_ids = [batch_id for (batch_id,) in db.execute("SELECT batch_id FROM batches ORDER BY rowid")]
    assert f"{len(batch_ids)} batch(es) submitted; the newest: {batch_ids[-1]}" in output
    with live_stack.client("alpha") as client:  # the ids the status names are the service's batches of the run
        jobs = {job_id for batch_id in batch_ids for job_id in client.get(f"/v1/batches/{batch_id}").json()["job_ids"]}
    assert jobs == {r["job_id"] for r in rows if r["source"] == "synthetic"}


def job_states(out: Path) -> Counter:
    if not (out / STATE_NAME).exists():
        return Counter()
    try:
        with sqlite3.connect(f"file:{out / STATE_NAME}?mode=ro", uri=True, timeout=1) as db:
            return Counter(state for (state,) in db.execute("SELECT state FROM jobs"))
    except sqlite3.Error:
        return Counter()


def test_balance_survives_three_sigkills(live_stack, nico_root, tmp_path):
    """SIGKILL once while uploading/submitting, once with jobs queued, once while downloading; then finish."""
    out = tmp_path / "balanced"
    args = ("balance", "--dataset", "nico++", "--root", str(nico_root), "--out", str(out), *FAST)
    rng = random.Random(1234)
    phases = [
        lambda s: sum(s.values()) > 0,  # the plan is bound: uploads and submission under way
        lambda s: s["submitted"] > 0,  # jobs queued or running on the service
        lambda s: s["done"] > s_done_before + 1,  # results being downloaded
    ]
    seen = []
    for phase, max_delay in zip(phases, (0.02, 0.3, 0.3), strict=False):
        s_done_before = job_states(out)["done"]
        process = cli(*args, key=live_stack.keys["beta"], url=live_stack.base_url)
        deadline = time.time() + 60
        while process.poll() is None and not phase(job_states(out)) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, max_delay))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        seen.append((process.returncode, dict(job_states(out))))
    assert any(code == -signal.SIGKILL for code, _ in seen), seen
    code, output = run_cli(*args, key=live_stack.keys["beta"], url=live_stack.base_url)
    assert code == 0, output
    rows = check_balanced_nicopp(out)
    # nothing was submitted twice: the one chunk went in as one batch (replayed by its Idempotency-Key after a kill),
    # no job needed a retry, and every plan slot kept its first job
    with sqlite3.connect(out / STATE_NAME) as db:
        states = db.execute("SELECT state, attempt, job_id, batch_id FROM jobs").fetchall()
    assert len(states) == 17 and all(s == "done" and attempt == 0 for s, attempt, _, _ in states)
    assert len({batch for *_, batch in states}) == 1
    assert {r["job_id"] for r in rows if r["source"] == "synthetic"} == {job_id for _, _, job_id, _ in states}


def test_server_down_then_resume_and_wrong_key(live_stack, nico_root, tmp_path):
    out = tmp_path / "balanced"
    args = ("balance", "--dataset", "nico++", "--root", str(nico_root), "--out", str(out), *FAST)
    code, output = run_cli(*args, key=live_stack.keys["alpha"], url="http://127.0.0.1:9")
    assert code == 3, output
    assert "cannot reach the fgs service" in output and "rerun the same command" in output
    code, output = run_cli(*args, key="wrong-key-" + "x" * 20, url=live_stack.base_url)
    assert code == 4, output
    assert "rejected the API key" in output
    code, output = run_cli(*args, key=live_stack.keys["alpha"], url=live_stack.base_url)
    assert code == 0, output
    check_balanced_nicopp(out)


def test_python_api_generate_and_balance_imagefolder(live_stack, tmp_path):
    with Client(live_stack.base_url, live_stack.keys["alpha"]) as client:
        result = client.generate(prompt="a cat", class_index=0, num_images=2, steps=4, guidance_every=2, seed=11)
        assert result.job.state.value == "finished" and len(result.images) == 2
        assert [r.seed for r in result.job.results] == [11, 12]
        assert all(image.format == "PNG" for image in result.pil_images())

        root = tmp_path / "folder"
        for class_name, n in (("ant", 3), ("bee", 1)):
            for i in range(n):
                write_image(root / class_name / f"{i}.png", i)
        (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
        report = balance(
            client,
            "imagefolder",
            root,
            tmp_path / "out",
            target=4,
            steps=4,
            guidance_every=2,
            images_per_job=4,
            show_progress=False,
        )
        assert report.complete and report.planned_images == 4 and report.synthetic_written == 4
        assert report.skipped_files == 1
        assert len(list((tmp_path / "out" / "ant").iterdir())) == 4
        assert len(list((tmp_path / "out" / "bee").iterdir())) == 4

    with Client(live_stack.base_url, "wrong-key-" + "y" * 20) as bad:
        with pytest.raises(AuthenticationFailed):
            bad.generate(prompt="a cat", class_index=0, steps=4, guidance_every=2)


def test_balance_imagenet_lt_and_digits_lt_layouts(live_stack, tmp_path):
    root = tmp_path / "inlt"
    lines = []
    for label, (wnid, n) in enumerate([("n01440764", 3), ("n01443537", 1)]):
        for i in range(n):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", i, "JPEG")
            lines.append(f"train/{wnid}/{wnid}_{i}.JPEG {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("val/x.JPEG 0\n")
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    out = tmp_path / "inlt-out"
    code, output = run_cli(
        "balance",
        "--dataset",
        "imagenet-lt",
        "--root",
        str(root),
        "--out",
        str(out),
        *FAST,
        key=live_stack.keys["alpha"],
        url=live_stack.base_url,
    )
    assert code == 0, output
    split = [line.split() for line in (out / "ImageNet_LT_train.txt").read_text().splitlines()]
    assert Counter(label for _, label in split) == {"0": 3, "1": 3}
    assert all((out / path).is_file() for path, _ in split)
    assert (out / "ImageNet_LT_test.txt").read_text() == "val/x.JPEG 0\n"
    assert len(list((out / "train/n01443537").glob("fgs_*.png"))) == 2

    digits = tmp_path / "digits"
    for digit, n in (("0", 2), ("1", 1)):
        for i in range(n):
            write_image(digits / "train" / digit / f"{i}.png", i)
    (digits / "digits_lt.json").write_text(json.dumps({"classes": ["0", "1"]}))
    out = tmp_path / "digits-out"
    code, output = run_cli(
        "balance",
        "--dataset",
        "digits-lt",
        "--root",
        str(digits),
        "--out",
        str(out),
        *FAST,
        key=live_stack.keys["alpha"],
        url=live_stack.base_url,
    )
    assert code == 0, output
    assert len(list((out / "train/1").glob("*.png"))) == 2 and (out / "digits_lt.json").is_file()
    rows = read_manifest_rows(out)
    assert Counter(r["class"] for r in rows) == {"0": 2, "1": 2}

    code, output = run_cli("grid", "--out", str(out), key="", url="")
    assert code == 0, output
    sheets = sorted((tmp_path / "digits-out-grid").glob("*.png"))
    assert len(sheets) == 2
    with Image.open(sheets[0]) as sheet:
        assert sheet.size == (8 * 96, 2 * (96 + 14))


def test_feedback_guided_balance_with_uploaded_classifier(live_stack, tmp_path):
    """upload-classifier then balance with entropy feedback; and hardness feedback with statistics from
    hardness-stats."""
    import numpy as np
    import torch

    from fgs_classifier.registry import LoadedClassifier
    from fgs_common.wire import ClassifierSpec
    from fgs_worker.guidance.criteria import entropy
    from support.tiny_classifier import TinyClassifier

    root = tmp_path / "folder"
    for class_name, n in (("ant", 3), ("bee", 1)):
        for i in range(n):
            write_image(root / class_name / f"{i}.png", i)
    torch.jit.save(torch.jit.script(TinyClassifier().eval()), str(tmp_path / "clf.pt"))
    (tmp_path / "spec.json").write_text(json.dumps({"num_classes": 2, "input_size": 8, "output": "logits_embedding"}))
    key, url = live_stack.keys["alpha"], live_stack.base_url

    code, output = run_cli(
        "upload-classifier",
        "--classifier",
        str(tmp_path / "clf.pt"),
        "--spec",
        str(tmp_path / "spec.json"),
        key=key,
        url=url,
    )
    assert code == 0, output
    classifier_id = output.strip().splitlines()[-1]
    out = tmp_path / "entropy"
    code, output = run_cli(
        "balance",
        "--dataset",
        "imagefolder",
        "--root",
        str(root),
        "--out",
        str(out),
        *FAST,
        "--criterion",
        "entropy",
        "--omega",
        "0.1",
        "--classifier-id",
        classifier_id,
        key=key,
        url=url,
    )
    assert code == 0, output
    synthetic = [r for r in read_manifest_rows(out) if r["source"] == "synthetic"]
    assert len(synthetic) == 2
    assert all(r["criterion"] == "entropy" and r["omega"] == "0.1" for r in synthetic)
    # each value is the entropy of its own image under the uploaded classifier, scored again here from the PNG
    # (whose 8-bit rounding moves it a little)
    spec = ClassifierSpec.model_validate_json((tmp_path / "spec.json").read_text())
    scorer = LoadedClassifier(TinyClassifier().eval(), spec, None, torch.device("cpu"), torch.float32)
    for r in synthetic:
        with Image.open(out / r["path"]) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        logits, _ = scorer(pixels[None])
        assert float(r["criterion_value"]) == pytest.approx(entropy(logits).item(), abs=1e-3), r

    code, output = run_cli(
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
        key=key,
        url=url,
    )
    assert code == 0, output
    out = tmp_path / "hardness"
    code, output = run_cli(
        "balance",
        "--dataset",
        "imagefolder",
        "--root",
        str(root),
        "--out",
        str(out),
        *FAST,
        "--criterion",
        "hardness",
        "--omega",
        "0.1",
        "--classifier",
        str(tmp_path / "clf.pt"),
        "--classifier-spec",
        str(tmp_path / "spec.json"),
        "--force",  # a random-weight classifier: the pre-flight on the images would refuse it
        "--hardness-stats",
        str(tmp_path / "stats.safetensors"),
        key=key,
        url=url,
    )
    assert code == 0, output
    synthetic = [r for r in read_manifest_rows(out) if r["source"] == "synthetic"]
    assert len(synthetic) == 2 and all(r["criterion"] == "hardness" and r["criterion_value"] for r in synthetic)


def test_failing_jobs_are_retried_then_reported(live_stack, tmp_path):
    """A classifier that breaks on batches of 3 makes the one 3-image job fail on every attempt."""
    import torch

    class BreaksOnThree(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 3:
                raise RuntimeError("this classifier refuses batches of 3")
            return self.head(x.mean(dim=(2, 3)))

    torch.jit.save(torch.jit.script(BreaksOnThree().eval()), str(tmp_path / "clf.pt"))
    (tmp_path / "spec.json").write_text(json.dumps({"num_classes": 2, "input_size": 8}))
    root = tmp_path / "folder"
    for class_name, n in (("ant", 5), ("bee", 2)):
        for i in range(n):
            write_image(root / class_name / f"{i}.png", i)
    out = tmp_path / "out"
    args = (
        "balance",
        "--dataset",
        "imagefolder",
        "--root",
        str(root),
        "--out",
        str(out),
        "--steps",
        "4",
        "--guidance-every",
        "2",
        "--images-per-job",
        "2",
        "--criterion",
        "entropy",
        "--omega",
        "0.1",
        "--classifier",
        str(tmp_path / "clf.pt"),
        "--classifier-spec",
        str(tmp_path / "spec.json"),
        "--force",  # a random-weight classifier: the pre-flight on the images would refuse it
        "--max-retries",
        "1",
        "--no-progress",
        "--target",
        '{"bee": 5}',
    )
    # bee: 2 real, 3 to add in jobs of 2 + 1 images: both succeed
    code, output = run_cli(*args, key=live_stack.keys["alpha"], url=live_stack.base_url)
    assert code == 0, output
    out3 = tmp_path / "out3"
    args3 = tuple(a if a != str(out) else str(out3) for a in args)
    args3 = tuple("3" if a == "2" and i > 0 and args3[i - 1] == "--images-per-job" else a for i, a in enumerate(args3))
    before = tenant_job_ids(live_stack, "alpha")  # tests run one at a time: the new jobs are this run's
    code, output = run_cli(*args3, key=live_stack.keys["alpha"], url=live_stack.base_url, timeout=240)
    assert code == 1, output
    assert "1 jobs failed after 1 retries" in output and "refuses batches of 3" in output
    with sqlite3.connect(out3 / STATE_NAME) as db:
        assert db.execute("SELECT state, attempt FROM jobs").fetchall() == [("failed", 1)]
    # the first attempt and its retry, each in a batch the run recorded: the batch views cover both
    run_jobs = tenant_job_ids(live_stack, "alpha") - before
    batches = run_batches(live_stack, "alpha", out3)
    assert len(run_jobs) == 2 and len(batches) == 2
    assert {job_id for job_ids in batches.values() for job_id in job_ids} == run_jobs
    rows = read_manifest_rows(out3)
    assert [r["source"] for r in rows].count("synthetic") == 0 and len(rows) == 7
    assert not list((out3 / "bee").glob("fgs_*"))
    code, output = run_cli("status", "--out", str(out3), key="", url="")
    assert code == 0 and "failed" in output and "refuses batches of 3" in output


def test_balance_larger_than_the_tenant_queue_cap(live_stack, tmp_path):
    """The capped tenant may queue 10 images: a 12-image plan goes in job by job as its own jobs finish."""
    from support.stack import CAPPED_MAX_IMAGES

    root = tmp_path / "folder"
    for class_name, n in (("ant", 13), ("bee", 1)):
        for i in range(n):
            write_image(root / class_name / f"{i}.png", i)
    out = tmp_path / "out"
    before = tenant_job_ids(live_stack, "capped")
    code, output = run_cli(
        "balance",
        "--dataset",
        "imagefolder",
        "--root",
        str(root),
        "--out",
        str(out),
        *FAST,
        key=live_stack.keys["capped"],
        url=live_stack.base_url,
    )
    assert CAPPED_MAX_IMAGES < 12
    assert code == 0, output
    assert len(list((out / "bee").glob("fgs_*.png"))) == 12
    with sqlite3.connect(out / STATE_NAME) as db:
        assert db.execute("SELECT COUNT(*), COUNT(batch_id) FROM jobs WHERE state='done'").fetchone() == (3, 3)
    # jobs sent alone when the queue was full are batches of one: the batch views cover every job of the run,
    # the gallery of each batch every image
    batches = run_batches(live_stack, "capped", out)
    synthetic = [r for r in read_manifest_rows(out) if r["source"] == "synthetic"]
    assert {job_id for job_ids in batches.values() for job_id in job_ids} == {r["job_id"] for r in synthetic}
    assert {r["job_id"] for r in synthetic} == tenant_job_ids(live_stack, "capped") - before
    shown = []
    with live_stack.client("capped") as client:
        for batch_id in batches:
            page = client.get("/v1/views/gallery", params={"batch_id": batch_id, "limit": 500}).json()
            shown += [item["job_id"] for item in page["items"]]
    assert sorted(shown) == sorted(r["job_id"] for r in synthetic)  # one item per image, every image
