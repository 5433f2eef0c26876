"""A rerun of `balance` after its tenant deleted a classifier or conditioning image the run's state file saved:
the client uploads them again instead of being refused (404) on every rerun.

The API in process (TestClient) on the session's redis-server, no workers: what is checked is what the client
submits and what the service then holds.
"""

from __future__ import annotations

import io
import zipfile

import pytest

from fgs_client.balance_options import BalanceOptions
from fgs_client.balance_planner import UnitCounts, plan_balance
from fgs_client.balance_runner import BalanceRun
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.dataset_readers import read_dataset
from fgs_client.http_client import Client
from fgs_common.wire import ClassifierSpec, Criterion, GenerationParams
from support.dataset_trees import write_image
from support.service_settings import in_process_client, service_settings


@pytest.fixture
def client(redis_server, tmp_path):
    with in_process_client(service_settings(redis_server, tmp_path / "data")) as api:
        yield api


def make_run(client: Client, tmp_path) -> BalanceRun:
    root = tmp_path / "data-set"
    for index in range(3):
        write_image(root / "apple" / f"{index}.png", value=index)
    write_image(root / "banana" / "0.png", value=10)
    dataset = read_dataset("imagefolder", root)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as members:  # TorchScript's layout: the upload check is off here
        members.writestr("clf/constants.pkl", b"")
        members.writestr("clf/code/__torch__.py", b"")
    (tmp_path / "clf.pt").write_bytes(archive.getvalue())
    spec = ClassifierSpec(num_classes=2, class_names=["apple", "banana"], input_size=32)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    options = BalanceOptions(
        generation=GenerationParams(criterion=Criterion.entropy, omega=0.03, steps=2, guidance_every=1),
        images_per_job=1,
        classifier=tmp_path / "clf.pt",
        classifier_spec=tmp_path / "spec.json",
        show_progress=False,
    )
    plan = plan_balance(UnitCounts.from_dataset(dataset), "max", images_per_job=1)
    return BalanceRun(client, dataset, tmp_path / "out", plan, options)


def open_state(run: BalanceRun) -> BalanceState:
    run.out.mkdir(parents=True, exist_ok=True)
    state = BalanceState(run.out / STATE_NAME)
    run.bind(state)
    return state


def submit_chunk(run: BalanceRun, state: BalanceState) -> None:
    run.submitter.submit_chunk(state, 0, collect_some=lambda: None)


def test_a_rerun_uploads_again_the_classifier_and_images_deleted_since_the_state_saved_them(client, tmp_path):
    first = make_run(client, tmp_path)
    state = open_state(first)
    first.inputs.resolve_classifier(state)  # the first run uploaded both, then was interrupted before submitting
    image_ids = {first.inputs.image_id(state, image) for slot in first.slots for image in slot.conditioning}
    assert image_ids and first.inputs.classifier_id
    client._request("DELETE", f"/v1/classifiers/{first.inputs.classifier_id}")
    for image_id in image_ids:
        client._request("DELETE", f"/v1/images/{image_id}")
    state.close()

    rerun = make_run(client, tmp_path)
    state = open_state(rerun)
    rerun.inputs.resolve_classifier(state)  # the saved id, which the service no longer has
    submit_chunk(rerun, state)
    submitted = state.active(10)
    assert len(submitted) == 2 and all(row.job_id for row in submitted)
    assert client.classifier(rerun.inputs.classifier_id).classifier_id == rerun.inputs.classifier_id  # uploaded again
    assert image_ids <= {image.image_id for image in client.images()}

    # a failed job's retry (its classifier deleted while it was queued) is built afresh too
    client._request("DELETE", f"/v1/classifiers/{rerun.inputs.classifier_id}")
    row = submitted[0]
    with rerun.progress_line(state) as progress:
        collector = rerun.collector(progress, reopened=set())
        assert collector._retry_or_fail(state, row, "classifier ... is no longer in the artifact store") == 0
    retried = next(r for r in state.active(10) if r.key == row.key)
    assert retried.attempt == 1 and retried.job_id != row.job_id
    assert client.classifier(rerun.inputs.classifier_id).classifier_id == rerun.inputs.classifier_id
    state.close()
