"""A first-time user's mistakes, end to end: the real `fgs-client` against a live stack (uvicorn + a worker on the
tiny model, given the embedded model's card: classes zero..nine), each mistake caught before a job is submitted,
and the output loaded by the tools people use (Hugging Face `datasets`, torchvision's ImageFolder layout)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_common.loopback import free_port
from fgs_common.presets import get_preset
from support.dataset_trees import write_image
from support.live_calls import client_process
from support.stack import start_stack
from support.tiny_classifier import make_brightness_set, write_brightness_classifier

FAST = ["--steps", "4", "--guidance-every", "2", "--images-per-job", "4"]
FRUIT = ["apple", "banana", "cherry", "delta", "echo", "fig", "golf", "hotel", "india", "juno"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BRIGHTNESS_ORDER = ["dark", "grey", "light"]


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    """One worker on the tiny model with the embedded model's card (its classes and prompt form)."""
    model = tmp_path_factory.mktemp("carded") / "tiny"
    shutil.copytree(tiny_model_dir, model)
    card = Path(__file__).parents[1] / "worker/fgs_worker/models/fgs-digits/model_card.json"
    shutil.copy(card, model / "model_card.json")
    live = start_stack(redis_server, model, tmp_path_factory.mktemp("newcomer"), workers=1)
    yield live
    live.close()


def cli(stack, *args: str, tenant: str = "alpha", key: str | None = None) -> subprocess.Popen:
    return client_process(*args, url=stack.base_url, key=key or stack.keys[tenant], COLUMNS="200")


def run_cli(stack, *args: str, **kwargs) -> tuple[int, str]:
    process = cli(stack, *args, **kwargs)
    output, _ = process.communicate(timeout=600)
    return process.returncode, " ".join(output.split())  # rich wraps lines: compare on single spaces


def job_total(stack, tenant: str) -> int:
    with stack.client(tenant) as client:
        return client.get("/v1/jobs", params={"limit": 1}).json()["total"]


def fruit_set(root: Path) -> Path:
    """Digits in folders named apple..juno: 2 images of apple, 1 of each other class."""
    for index, name in enumerate(FRUIT):
        for i in range(2 if name == "apple" else 1):
            write_image(root / name / f"{i}.png", value=10 * index + i)
    return root


def test_prompts_the_model_never_saw_are_refused_before_submitting_and_a_prompts_file_fixes_them(stack, tmp_path):
    with stack.client("alpha") as client:  # what the model knows, without the servers' paths
        info = client.get("/v1/model").json()
    assert info["model"] == "tiny" and "/tmp" not in json.dumps(info), info
    root = fruit_set(tmp_path / "fruit")
    base = ["balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(tmp_path / "o")]
    code, dry = run_cli(stack, *base, "--dry-run")  # the dry run asks the service's model too
    assert code == 0 and "error: 10 of the prompts name no class the model" in dry, dry
    before = job_total(stack, "alpha")
    code, output = run_cli(stack, *base, *FAST)  # no silent waste: nothing is submitted
    assert code == 2 and "10 of the prompts name no class the model" in output, output
    assert "'a handwritten digit {class_name}'" in output and "--force generates them anyway" in output
    assert job_total(stack, "alpha") == before
    code, output = run_cli(stack, *base, *FAST, "--force")
    assert code == 0, output
    warning = output.index("10 of the prompts name no class the model")
    assert "generating anyway (--force)" in output
    assert "It knows zero, one, two" in output and "'a handwritten digit {class_name}'" in output
    assert warning < output.index("submitting the jobs")
    # a real run shows what it runs, as the dry run does: the plan and every parameter with its source
    assert output.index("balance plan") < output.index("generation parameters") < warning
    assert "default (fgs_common/wire/generation.py)" in output

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f: f"a handwritten digit {d}" for f, d in zip(FRUIT, DIGITS, strict=True)}))
    out = tmp_path / "mapped"
    args = ["balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), "--prompts", str(prompts)]
    code, dry = run_cli(stack, *args, "--dry-run")
    assert code == 0 and "a handwritten digit nine" in dry  # the plan table shows the prompts
    code, output = run_cli(stack, *args, *FAST)
    assert code == 0, output
    assert "name no class" not in output
    assert re.search(r"generated at \d+\.\d\d img/s \(first start to last end on the service\)", output), output
    with open(out / "manifest.csv", newline="") as handle:
        synthetic = [row for row in csv.DictReader(handle) if row["source"] == "synthetic"]
    assert {(row["class"], row["prompt"]) for row in synthetic} == {
        (f, f"a handwritten digit {d}") for f, d in zip(FRUIT[1:], DIGITS[1:], strict=True)
    }

    # folders named as the model's classes, prompted bare: a note names the form it was trained with
    digits = tmp_path / "digits"
    for index, name in enumerate(DIGITS):
        write_image(digits / name / "0.png", value=10 * index)
    code, dry = run_cli(stack, "balance", "--dataset", "imagefolder", "--root", str(digits), "--dry-run")
    assert code == 0 and "name no class" not in dry, dry
    assert "10 prompts name the model's classes but not as it was trained" in dry
    assert "--prompt-template 'a handwritten digit {class_name}'" in dry
    templated = ["--prompt-template", "a handwritten digit {class_name}"]
    code, dry = run_cli(stack, "balance", "--dataset", "imagefolder", "--root", str(digits), *templated, "--dry-run")
    assert code == 0 and "not as it was trained" not in dry, dry


def test_the_balanced_output_loads_in_hugging_face_datasets_and_as_class_folders(stack, tmp_path):
    root = fruit_set(tmp_path / "fruit")
    out = tmp_path / "balanced"
    code, output = run_cli(
        stack, "balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), "--no-progress", *FAST,
        "--force",  # fruit names the model does not know: the output's format is what this test is about
    )  # fmt: skip
    assert code == 0, output
    assert "Hugging Face metadata" in output
    import datasets  # the dev extra

    # as the README says: the features file makes `label` a ClassLabel with the class names, `group` a string
    features = datasets.Features.from_dict(json.loads((out / "features.json").read_text()))
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(out), features=features, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.features["label"].names == sorted(FRUIT)
    assert Counter(loaded.features["label"].int2str(loaded["label"])) == {name: 2 for name in FRUIT}
    assert Counter(loaded["source"]) == {"real": 11, "synthetic": 9}
    assert set(loaded["group"]) == {None}  # no groups: empty, not NaN

    # torchvision's ImageFolder: one folder per class, sorted names as class indices, image files inside
    dest = tmp_path / "by-class"
    code, output = run_cli(stack, "class-folders", "--out", str(out), "--dest", str(dest))
    assert code == 0, output
    folders = sorted(p.name for p in dest.iterdir() if p.is_dir())
    assert folders == sorted(FRUIT)
    assert {name: len(list((dest / name).glob("*.png"))) for name in folders} == {name: 2 for name in FRUIT}
    features = datasets.Features.from_dict(json.loads((dest / "features.json").read_text()))
    by_class = datasets.load_dataset(
        "imagefolder", data_dir=str(dest), features=features, split="train", cache_dir=str(tmp_path / "hf2")
    )
    assert Counter(by_class.features["label"].int2str(by_class["label"])) == {name: 2 for name in FRUIT}


def test_a_classifier_listing_the_classes_in_another_order_is_mapped_and_other_classes_are_refused(stack, tmp_path):
    root = tmp_path / "bright"
    make_brightness_set(root, {"dark": 4, "grey": 2, "light": 1})
    archive, spec = write_brightness_classifier(tmp_path / "clf", ["light", "grey", "dark"])
    out = tmp_path / "o"
    args = ["balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), *FAST]
    args += ["--force"]  # prompts the model does not know (dark, grey, light): the classes are what is checked here
    code, output = run_cli(stack, *args, "--classifier", str(archive), "--classifier-spec", str(spec), tenant="beta")
    assert code == 0, output
    assert "another order; mapped by name" in output and "dark -> 2" in output and "light -> 0" in output
    assert "recognises 100% of 7" in output  # the pre-flight, through the mapping
    with stack.client("beta") as client:
        jobs = client.get("/v1/jobs").json()["jobs"]
    assert {(j["request"]["prompt"], j["request"]["class_index"]) for j in jobs} == {("grey", 1), ("light", 0)}

    before = job_total(stack, "beta")
    other = tmp_path / "other.json"
    other.write_text(spec.read_text().replace('"light"', '"white"'))
    args[args.index(str(out))] = str(tmp_path / "refused")
    code, output = run_cli(stack, *args, "--classifier", str(archive), "--classifier-spec", str(other), tenant="beta")
    assert code == 2, output
    flat = " ".join(output.split())
    assert "only in the spec (1): white" in flat and "only in the dataset (1): light" in flat
    assert job_total(stack, "beta") == before


def digit_prompts(tmp_path: Path) -> str:
    """A --prompts file naming a digit the model knows for each brightness class."""
    path = tmp_path / "digit-prompts.json"
    path.write_text(json.dumps({name: f"a handwritten digit {DIGITS[i]}" for i, name in enumerate(BRIGHTNESS_ORDER)}))
    return str(path)


def test_a_spec_with_the_wrong_normalisation_is_refused_by_the_preflight_unless_forced(stack, tmp_path):
    root = tmp_path / "bright"
    make_brightness_set(root, {"dark": 4, "grey": 2, "light": 1})
    archive, spec = write_brightness_classifier(tmp_path / "clf", BRIGHTNESS_ORDER, mean=0.0, std=1.0)
    args = ["balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(tmp_path / "o"), *FAST]
    args += ["--classifier", str(archive), "--classifier-spec", str(spec), "--prompts", digit_prompts(tmp_path)]
    code, output = run_cli(stack, *args, tenant="capped")
    assert code == 2, output
    assert "pre-flight: the classifier recognises" in output and "mean/std" in output and "--force" in output
    assert job_total(stack, "capped") == 0
    code, output = run_cli(stack, *args, "--force", tenant="capped")
    assert code == 0, output
    assert "running anyway (--force)" in output and job_total(stack, "capped") > 0


def test_omega_without_a_criterion_is_an_error_and_a_criterion_at_omega_0_is_explained(tmp_path):
    root = fruit_set(tmp_path / "fruit")
    base = [sys.executable, "-m", "fgs_client.cli", "balance", "--dataset", "imagefolder", "--root", str(root)]
    unguided = subprocess.run([*base, "--omega", "0.1", "--dry-run"], capture_output=True, text=True)
    assert unguided.returncode == 2
    assert "omega 0.1 needs a criterion" in " ".join(unguided.stderr.split())
    nowhere = ["--url", f"http://127.0.0.1:{free_port()}"]  # no service: the dry run says what it did not check
    control = subprocess.run([*base, *nowhere, "--criterion", "entropy", "--dry-run"], capture_output=True, text=True)
    assert control.returncode == 0
    explained = " ".join(control.stderr.split())
    assert "prompts not checked against the model" in explained
    # the dry run plans anyway, and says what the real run would refuse: a criterion with no classifier
    assert "a real run refuses these settings: --criterion entropy scores images with your classifier" in explained
    assert "scores each image without steering it" in explained
    omega = get_preset("paper-imagenet-lt").generation_params().omega
    assert f"give --omega (e.g. {omega:g}, preset paper-imagenet-lt's value)" in explained


def test_ctrl_c_says_what_is_left_on_the_service_and_cancel_ends_it(stack, tmp_path):
    root = fruit_set(tmp_path / "fruit")
    out = tmp_path / "o"
    process = cli(
        stack, "balance", "--dataset", "imagefolder", "--root", str(root), "--out", str(out), "--target", "12",
        "--steps", "400", "--images-per-job", "2", "--no-progress", "--force",
    )  # fmt: skip
    # 400 steps: with cross-job batching 109 tiny-model images at 30 steps were all done before the Ctrl-C came
    deadline = time.time() + 120
    while not _submitted(out) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)  # a loaded machine takes a while to stop the run
    output = " ".join(output.split())
    assert process.returncode == 130, output
    assert "were submitted and not collected yet: queued, running or finished on the service" in output
    assert "Rerun the same command to resume" in output and f"fgs-client cancel --out {out}" in output

    job_ids = [row.job_id for row in _rows(out)]
    code, canceled = run_cli(stack, "cancel", "--out", str(out))
    assert code == 0 and "canceled" in canceled, canceled
    with stack.client("alpha") as client:
        deadline = time.time() + 60
        while time.time() < deadline:
            states = {client.get(f"/v1/jobs/{job_id}").json()["state"] for job_id in job_ids}
            if states <= {"finished", "failed", "canceled"}:
                break
            time.sleep(0.5)
    assert states <= {"finished", "canceled"} and "canceled" in states


def _rows(out: Path):
    state = BalanceState(out / STATE_NAME)
    try:
        return state.rows("submitted")
    finally:
        state.close()


def _submitted(out: Path) -> bool:
    return (out / STATE_NAME).is_file() and bool(_rows(out))


def test_a_wrong_key_says_where_a_key_comes_from_and_classifiers_are_listed_by_name_and_deleted(stack, tmp_path):
    code, output = run_cli(stack, "classifiers", key="not-a-key")
    assert code == 4 and "FGS_DEV_API_KEY" in output and "--api-key" in output, output
    archive, spec = write_brightness_classifier(tmp_path / "clf", BRIGHTNESS_ORDER)
    code, classifier_id = run_cli(
        stack, "upload-classifier", "--classifier", str(archive), "--spec", str(spec), "--name", "brightness v1"
    )
    assert code == 0, classifier_id
    code, listed = run_cli(stack, "classifiers")
    assert code == 0 and "brightness v1" in listed and "dark, grey, light" in listed
    code, _ = run_cli(stack, "classifiers", "--delete", classifier_id)
    assert code == 0
    with stack.client("alpha") as client:
        assert classifier_id not in {c["classifier_id"] for c in client.get("/v1/classifiers").json()}
    assert httpx.get(f"{stack.base_url}/v1/jobs").json()["error"]["message"].startswith("no API key was sent")


def test_conditioning_images_are_listed_by_name_and_deleted_from_the_command_line(stack, tmp_path):
    write_image(tmp_path / "my-seven.png", value=7)
    with stack.client("alpha") as client:
        files = {"file": ("my-seven.png", (tmp_path / "my-seven.png").read_bytes(), "image/png")}
        uploaded = client.post("/v1/images", files=files)
    assert uploaded.status_code == 201, uploaded.text
    image_id = uploaded.json()["image_id"]
    code, listed = run_cli(stack, "images")
    assert code == 0 and "my-seven.png" in listed and image_id[:12] in listed, listed
    code, output = run_cli(stack, "images", "--delete", image_id)
    assert code == 0 and f"deleted image {image_id}" in output
    with stack.client("alpha") as client:
        assert image_id not in {i["image_id"] for i in client.get("/v1/images").json()}
    code, output = run_cli(stack, "images", "--delete", image_id)  # gone already: a 404, said as such
    assert code != 0 and f"no image with id {image_id!r}" in output, output
