"""Tenancy: every object is its tenant's own, per-tenant caps, and round-robin across tenant queues."""

from __future__ import annotations

import time

from support.live_calls import JobState, generate, get_job, png_bytes, upload_classifier, wait_final, wait_for
from support.stack import CAPPED_MAX_IMAGES


def test_other_tenants_objects_are_404(live_stack, classifier_files):
    archive, spec = classifier_files
    with live_stack.client("alpha") as alpha, live_stack.client("beta") as beta:
        image_id = alpha.post("/v1/images", files={"file": ("a.png", png_bytes(7), "image/png")}).json()["image_id"]
        classifier = upload_classifier(alpha, archive.read_bytes(), spec)
        assert classifier.status_code == 201, classifier.text
        classifier_id = classifier.json()["classifier_id"]
        job_id = generate(alpha, steps=400, num_images=4, conditioning_image_ids=[image_id])

        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("DELETE", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/images/{image_id}"),
            ("GET", f"/v1/classifiers/{classifier_id}"),
        ]:
            response = beta.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
        assert job_id not in [j["job_id"] for j in beta.get("/v1/jobs").json()["jobs"]]
        assert job_id in [j["job_id"] for j in alpha.get("/v1/jobs").json()["jobs"]]
        assert classifier_id not in [c["classifier_id"] for c in beta.get("/v1/classifiers").json()]
        # beta cannot use alpha's image or classifier either
        assert generate_status(beta, conditioning_image_ids=[image_id]) == 404
        assert generate_status(beta, classifier_id=classifier_id, criterion="entropy", omega=0.1) == 404
        # beta's cancel attempt did nothing
        assert get_job(alpha, job_id).state in (JobState.queued, JobState.running)
        assert alpha.delete(f"/v1/jobs/{job_id}").status_code == 202
        assert wait_final(alpha, job_id).state is JobState.canceled


def generate_status(client, **overrides) -> int:
    body = {"prompt": "a photo", "class_index": 1, "num_images": 1, "steps": 2, "guidance_every": 1}
    body.update(overrides)
    return client.post("/v1/generate", json=body).status_code


def test_tenant_over_its_cap_gets_429_with_retry_after(live_stack):
    with live_stack.client("capped") as capped:
        too_many = capped.post(
            "/v1/generate", json={"prompt": "a photo", "class_index": 0, "num_images": CAPPED_MAX_IMAGES + 1}
        )
        assert too_many.status_code == 429
        assert int(too_many.headers["Retry-After"]) > 0
        assert "cap" in too_many.json()["error"]["message"]

        first = generate(capped, num_images=CAPPED_MAX_IMAGES, steps=900, guidance_every=5)
        one_more = capped.post("/v1/generate", json={"prompt": "a photo", "class_index": 0, "num_images": 1})
        assert one_more.status_code == 429, one_more.text
        batch = capped.post("/v1/batches", json={"jobs": [{"prompt": "a photo", "class_index": 0}]})
        assert batch.status_code == 429
        assert capped.delete(f"/v1/jobs/{first}").status_code == 202
        final = wait_final(capped, first)
        assert final.state is JobState.canceled, final.error
        # the canceled job's images no longer count against the cap
        assert generate_status(capped, num_images=CAPPED_MAX_IMAGES, steps=1) == 202


def test_one_small_job_is_not_starved_by_a_big_plan(live_stack):
    with live_stack.client("alpha") as alpha, live_stack.client("beta") as beta:
        plan = [
            {
                "prompt": "a photo of digit two",
                "class_index": 2,
                "num_images": 1,
                "steps": 3,
                "guidance_every": 1,
                "seed": i,
            }
            for i in range(300)
        ]
        accepted = alpha.post("/v1/batches", json={"jobs": plan})
        assert accepted.status_code == 202, accepted.text
        batch_id, alpha_jobs = accepted.json()["batch_id"], accepted.json()["job_ids"]
        time.sleep(0.5)  # the workers are busy with alpha's plan
        before = alpha.get(f"/v1/batches/{batch_id}").json()["counts"]["finished"]
        small = generate(beta, steps=3, guidance_every=1)
        assert wait_final(beta, small, timeout=120).state is JobState.finished
        progress = alpha.get(f"/v1/batches/{batch_id}").json()
        assert progress["images_total"] == 300
        # beta's job waited for what was running and its turn, not for alpha's queue: with 2 workers taking up
        # to 8 images per call, about 2 calls of alpha's per worker at most (counts read between requests)
        waited_for = progress["counts"]["finished"] - before
        assert before < 250 and waited_for <= 40, (before, progress["counts"])
        for job_id in alpha_jobs:  # free the workers for the other tests
            alpha.delete(f"/v1/jobs/{job_id}")
        wait_for(alpha, alpha_jobs[-1], lambda j: j.state.is_terminal)
