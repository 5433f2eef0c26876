"""Cancel: a queued job never runs; a running job stops within two denoising steps and is `canceled`."""

from __future__ import annotations

import time

from support.live_calls import JobState, generate, get_job, wait_final, wait_for


def test_cancel_queued_and_running_jobs(live_stack):
    with live_stack.client("alpha") as alpha:
        # Two long jobs occupy both workers; the third waits in the queue.
        long_jobs = [generate(alpha, num_images=8, steps=400, guidance_every=5, seed=s) for s in (1, 2)]
        for job_id in long_jobs:
            wait_for(alpha, job_id, lambda j: j.state is JobState.running and j.progress.step >= 2, timeout=120)
        queued = generate(alpha, num_images=1, steps=2, guidance_every=1)
        assert get_job(alpha, queued).state is JobState.queued

        response = alpha.delete(f"/v1/jobs/{queued}")
        assert response.status_code == 202
        assert response.json()["state"] == "canceled"

        for job_id in long_jobs:
            response = alpha.delete(f"/v1/jobs/{job_id}")
            assert response.status_code == 202
            step_when_canceled = response.json()["progress"]["step"]
            final = wait_final(alpha, job_id, timeout=60)
            assert final.state is JobState.canceled
            assert final.progress.step <= step_when_canceled + 2, (step_when_canceled, final.progress)
            assert final.progress.images_done == 0 and final.results == []

        # The workers are free again; the canceled queued job still never ran.
        check = generate(alpha, num_images=1, steps=2, guidance_every=1)
        assert wait_final(alpha, check).state is JobState.finished
        time.sleep(0.5)
        never_ran = get_job(alpha, queued)
        assert never_ran.state is JobState.canceled
        assert never_ran.started_at is None and never_ran.progress.step == 0 and never_ran.results == []

        again = alpha.delete(f"/v1/jobs/{queued}")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


def test_idempotency_key_returns_the_first_job(live_stack):
    with live_stack.client("alpha") as alpha:
        body = {"prompt": "a photo", "class_index": 0, "num_images": 1, "steps": 2, "guidance_every": 1}
        first = alpha.post("/v1/generate", json=body, headers={"Idempotency-Key": "retry-me-1"})
        second = alpha.post("/v1/generate", json=body, headers={"Idempotency-Key": "retry-me-1"})
        assert first.status_code == second.status_code == 202
        assert first.json()["job_id"] == second.json()["job_id"]
        other = alpha.post("/v1/generate", json=body, headers={"Idempotency-Key": "retry-me-2"})
        assert other.json()["job_id"] != first.json()["job_id"]

        plan = {"jobs": [body, dict(body, seed=5)]}
        batch_1 = alpha.post("/v1/batches", json=plan, headers={"Idempotency-Key": "plan-1"}).json()
        batch_2 = alpha.post("/v1/batches", json=plan, headers={"Idempotency-Key": "plan-1"}).json()
        assert batch_1 == batch_2 and len(batch_1["job_ids"]) == 2
        # the key is per tenant: beta's identical key is a new job
        with live_stack.client("beta") as beta:
            assert (
                beta.post("/v1/generate", json=body, headers={"Idempotency-Key": "retry-me-1"}).json()["job_id"]
                != first.json()["job_id"]
            )
        for job_id in [first.json()["job_id"], other.json()["job_id"], *batch_1["job_ids"]]:
            assert wait_final(alpha, job_id).state is JobState.finished
