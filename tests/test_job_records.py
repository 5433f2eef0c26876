"""The job state machine of fgs_common.job_records on a real Redis: the Lua transition moves state, the tenant's
queued-image count and the jobs-by-state counter together, once, and never out of a final state."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from fgs_common.job_records import ACTIVE_STATES, JobRecords
from fgs_common.telemetry import counter_field, counter_key
from fgs_common.wire import GenerateRequest, ImageResult, JobState
from support.service_settings import fresh_prefix

TENANT = "alpha"
# Every transition fgs makes, as (new state, allowed current states):
CLAIM = (JobState.running, (JobState.queued,))  # a worker takes a queued job
TAKE_OVER = (JobState.running, (JobState.running,))  # a worker takes over a dead worker's job
RETRY = (JobState.queued, (JobState.running,))  # a failed attempt goes back to the queue
CANCEL = (JobState.canceled, (JobState.queued,))  # the API cancels a queued job
RECONCILE = (JobState.failed, ACTIVE_STATES)  # RQ gave up on an active job
ENDS = [(state, (JobState.running,)) for state in (JobState.finished, JobState.failed, JobState.canceled)]
ALL_TRANSITIONS = [CLAIM, TAKE_OVER, RETRY, CANCEL, RECONCILE, *ENDS]


@pytest.fixture
def records(redis_server):
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    yield JobRecords(client, fresh_prefix())
    client.close()


def create_job(records: JobRecords, job_id: str, num_images: int = 3) -> None:
    """A queued record and its reserved images, as JobQueue.enqueue leaves them."""
    request = GenerateRequest(prompt="a digit", class_index=1, num_images=num_images, steps=2, guidance_every=1)
    with records.redis.pipeline(transaction=True) as pipe:
        records.create(pipe, job_id, TENANT, request, None, 1_700_000_000.0)
        pipe.incrby(records.keys.queued_images(TENANT), num_images)
        pipe.execute()


def queued_images(records: JobRecords) -> int:
    return int(records.redis.get(records.keys.queued_images(TENANT)) or 0)


def entered(records: JobRecords, state: JobState) -> float:
    """How many times the jobs-by-state counter says a job entered `state`."""
    field = counter_field("jobs", {"tenant": TENANT, "criterion": "none", "status": state.value})
    return float(records.redis.hget(counter_key(records.keys.prefix), field) or 0)


def test_a_job_runs_and_finishes_moving_each_counter_once(records):
    create_job(records, "j1", num_images=3)
    assert queued_images(records) == 3 and entered(records, JobState.queued) == 1
    assert records.transition("j1", *CLAIM, step=0, steps_total=2, owner="w1") is True
    assert queued_images(records) == 3  # running images still count against the cap
    assert records.set_progress("j1", "w1", results_from=0, results=[ImageResult(image_id="ab" * 32, seed=7)])
    assert records.transition("j1", JobState.finished, (JobState.running,), images_done=3) is True
    record = records.read("j1")
    assert record.state is JobState.finished and record.images_done == 3
    assert queued_images(records) == 0
    assert [entered(records, s) for s in JobState] == [1, 1, 1, 0, 0]
    job = record.public()
    assert job.state is JobState.finished and [(r.image_id, r.seed) for r in job.results] == [("ab" * 32, 7)]


def test_results_are_appended_at_their_index_by_their_owner_and_a_new_claim_empties_them(records):
    """Each chunk appends its results; a chunk sampled again replaces what it had reported; a worker that lost the
    job writes none; a claim that does not resume starts the list over."""
    create_job(records, "j1", num_images=3)
    assert records.transition("j1", *CLAIM, owner="w1")
    image = [ImageResult(image_id=f"{i:064x}", seed=i) for i in range(4)]
    assert records.set_progress("j1", "w1", results_from=0, results=image[:2], images_done=2)
    assert records.set_progress("j1", "w1", results_from=1, results=[image[3]], images_done=2)  # sampled again
    assert records.set_progress("j1", "someone-else", results_from=2, results=[image[2]]) is False
    record = records.read("j1")
    assert [r.seed for r in record.results] == [0, 3] and record.images_done == 2
    assert records.read("j1", with_results=False).results is None
    assert 0 < records.redis.ttl(records.keys.results("j1")) <= records.redis.ttl(records.keys.job("j1"))
    assert records.transition("j1", *TAKE_OVER, expect_owner="w1", owner="w2", clear_results=True)
    assert records.read("j1").results == ()


def test_a_record_of_the_earlier_layout_keeps_its_results(records):
    """Before results had a list of their own they were one JSON array in the job hash: a finished job stored
    then (records live 30 days) still shows its images."""
    create_job(records, "old", num_images=2)
    assert records.transition("old", *CLAIM, owner="w1")
    assert records.transition("old", JobState.finished, (JobState.running,), images_done=2)
    earlier = [ImageResult(image_id=f"{i:064x}", seed=i).model_dump(mode="json") for i in range(2)]
    records.redis.hset(records.keys.job("old"), "results", json.dumps(earlier))
    assert [r.seed for r in records.read("old").results] == [0, 1]
    assert len(records.read("old").public().results) == 2


def test_a_restart_forgets_the_earlier_layouts_results_and_a_resume_moves_them(records):
    """A job of the earlier layout that starts over (a take-over) shows none of its old results; one that resumes
    keeps them, in its list from then on."""
    earlier = [ImageResult(image_id=f"{i:064x}", seed=i) for i in range(2)]
    for job_id in ("over", "resumed"):
        create_job(records, job_id, num_images=4)
        assert records.transition(job_id, *CLAIM, owner="w1")
        records.redis.hset(
            records.keys.job(job_id), "results", json.dumps([r.model_dump(mode="json") for r in earlier])
        )
    assert records.transition("over", *TAKE_OVER, expect_owner="w1", owner="w2", clear_results=True)
    assert records.read("over").results == ()
    assert records.adopt_earlier_results("resumed", "w1", earlier)
    assert records.set_progress("resumed", "w1", results_from=2, results=[ImageResult(image_id="c" * 64, seed=2)])
    assert [r.seed for r in records.read("resumed").results] == [0, 1, 2]
    assert records.adopt_earlier_results("resumed", "w1", earlier) is False  # moved once


@pytest.mark.parametrize("final", [JobState.finished, JobState.failed, JobState.canceled])
def test_no_transition_leaves_a_final_state(records, final):
    create_job(records, "j1", num_images=2)
    if final is JobState.canceled:
        assert records.transition("j1", *CANCEL)
    else:
        assert records.transition("j1", *CLAIM)
        assert records.transition("j1", final, (JobState.running,))
    before = records.redis.hgetall(counter_key(records.keys.prefix))
    for new, allowed in ALL_TRANSITIONS:
        assert records.transition("j1", new, allowed, error="late") is False, (new, allowed)
    stored = records.redis.hgetall(records.keys.job("j1"))
    assert stored["state"] == final.value and "error" not in stored  # refused changes write no field either
    assert records.redis.hgetall(counter_key(records.keys.prefix)) == before
    assert queued_images(records) == 0


def test_a_retry_keeps_the_images_reserved(records):
    create_job(records, "j1", num_images=4)
    assert records.transition("j1", *CLAIM)
    assert records.transition("j1", *RETRY, error='{"code": "retrying", "message": "again"}')
    assert records.read("j1").state is JobState.queued
    assert queued_images(records) == 4
    assert entered(records, JobState.queued) == 2  # created, then requeued
    assert records.transition("j1", *CANCEL)
    assert queued_images(records) == 0


def test_racing_final_transitions_release_the_images_exactly_once(records):
    """Eight threads try to end one running job (a worker finishing, a cancel, a reconcile): one wins."""
    create_job(records, "j1", num_images=5)
    create_job(records, "other", num_images=2)  # the tenant's other job keeps its reservation
    assert records.transition("j1", *CLAIM)
    results: list[bool] = []
    candidates = [ENDS[0], ENDS[1], ENDS[2], RECONCILE] * 2
    barrier = threading.Barrier(len(candidates))

    def attempt(new, allowed):
        barrier.wait()
        results.append(records.transition("j1", new, allowed))

    threads = [threading.Thread(target=attempt, args=c) for c in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert queued_images(records) == 2
    assert sum(entered(records, s) for s in (JobState.finished, JobState.failed, JobState.canceled)) == 1


def test_a_released_count_never_goes_below_zero(records):
    """A counter lost (e.g. Redis restarted without it) is floored at 0, not left negative to lift the cap."""
    create_job(records, "j1", num_images=3)
    records.redis.delete(records.keys.queued_images(TENANT))
    assert records.transition("j1", *CANCEL)
    assert records.redis.get(records.keys.queued_images(TENANT)) == "0"


def test_a_missing_job_is_refused_and_reads_empty(records):
    assert records.transition("nope", *CLAIM) is False
    assert records.read("nope") is None
    assert records.tenant_of("nope") is None
    assert records.redis.exists(records.keys.job("nope")) == 0
