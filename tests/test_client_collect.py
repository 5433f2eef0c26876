"""A balance run collects per batch: one GET /v1/batches/{batch_id} per batch and poll, and a job read on its own
only in a batch where more jobs ended than the run has collected. Every job it submits lies in a batch it records.

The API in process (TestClient) on the session's redis-server, no workers: every job stays queued until the test
cancels it on the service.
"""

from __future__ import annotations

import pytest

from fgs_client.balance_options import BalanceOptions
from fgs_client.balance_planner import UnitCounts, plan_balance
from fgs_client.balance_runner import BalanceRun
from fgs_client.balance_state import STATE_NAME, BalanceState
from fgs_client.dataset_readers import read_dataset
from fgs_common.wire import JobState
from support.dataset_trees import write_image
from support.live_calls import recorded_calls
from support.service_settings import in_process_client, service_settings


@pytest.fixture
def run_and_state(redis_server, tmp_path):
    """A run of 4 one-image jobs (5 apples, 1 banana, target max), its first chunk submitted."""
    root = tmp_path / "data-set"
    for index in range(5):
        write_image(root / "apple" / f"{index}.png", value=index)
    write_image(root / "banana" / "0.png", value=10)
    dataset = read_dataset("imagefolder", root)
    plan = plan_balance(UnitCounts.from_dataset(dataset), "max", images_per_job=1)
    with in_process_client(service_settings(redis_server, tmp_path / "data")) as client:
        run = BalanceRun(client, dataset, tmp_path / "out", plan, BalanceOptions(images_per_job=1, show_progress=False))
        run.out.mkdir()
        state = BalanceState(run.out / STATE_NAME)
        run.bind(state)
        run.submitter.submit_chunk(state, 0, collect_some=lambda: None)
        yield run, state
        state.close()


def test_a_poll_asks_per_batch_and_reads_jobs_only_where_some_ended(run_and_state, monkeypatch):
    run, state = run_and_state
    rows = state.active(10)
    assert len(rows) == 4 and len({row.batch_id for row in rows}) == 1
    batch_id = rows[0].batch_id
    assert state.batch_ids() == [batch_id]
    calls = recorded_calls(run.client, monkeypatch)
    with run.progress_line(state) as progress:
        collector = run.collector(progress, reopened=set())
        assert collector.poll_once(state) is False
        assert calls == [("GET", f"/v1/batches/{batch_id}")]  # all queued: no job read on its own

        run.client.cancel(rows[2].job_id)  # someone cancels the third job on the service
        calls.clear()
        assert collector.poll_once(state) is True
        jobs_read = [path.rsplit("/", 1)[1] for method, path in calls if path.startswith("/v1/jobs/")]
        assert calls[0] == ("GET", f"/v1/batches/{batch_id}")
        assert jobs_read == [row.job_id for row in rows[:3]]  # in order, up to the one that ended; not the fourth

        calls.clear()
        assert collector.poll_once(state) is False
        assert calls == [("GET", f"/v1/batches/{batch_id}")]  # the canceled job is collected: nothing new ended
    assert [(row.key, row.state) for row in state.rows("canceled")] == [(rows[2].key, "canceled")]
    assert run.client.job(rows[3].job_id).state is JobState.queued


def test_a_retry_is_a_batch_of_its_own_that_the_state_records(run_and_state):
    run, state = run_and_state
    first = state.active(1)[0]
    run.client.cancel(first.job_id)
    with run.progress_line(state) as progress:
        collector = run.collector(progress, reopened={first.key})  # a rerun resubmits what was canceled before it
        assert collector.poll_once(state) is True
    retried = next(row for row in state.active(10) if row.key == first.key)
    assert retried.attempt == 1 and retried.job_id != first.job_id and retried.batch_id != first.batch_id
    assert state.batch_ids() == [first.batch_id, retried.batch_id]
    assert run.client.batch(retried.batch_id).job_ids == [retried.job_id]
    every_job = {job_id for batch_id in state.batch_ids() for job_id in run.client.batch(batch_id).job_ids}
    assert every_job == {row.job_id for row in state.active(10)} | {first.job_id}
