"""A criterion value that is not finite (a classifier that outputs NaN) is stored as null plus a flag, so the job
record, the API's answer and the PNG metadata stay valid JSON (issue 10, defect 8).

Real parts: the API in process on a private redis-server, the tiny model, the real RQ worker class running the
job in this process, a real TorchScript classifier whose logits are NaN.
"""

from __future__ import annotations

import io
import json

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fgs_common.wire import ClassifierOutput, ClassifierSpec
from support.worker_loop import in_process_settings, start_worker

API_KEY = "key-nan-" + "n" * 24


class NaNLogits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan")) + 0 * x.mean()


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON parser outside Python does."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON: {text[:300]}"))


def test_a_nan_criterion_value_is_null_with_a_flag(redis_server, tiny_model_dir, tmp_path):
    from fgs_service.app import create_app

    settings = in_process_settings(redis_server, tiny_model_dir, tmp_path, "nan", dev_api_key=API_KEY, job_retries=0)
    archive = tmp_path / "nan.pt"
    torch.jit.script(NaNLogits()).save(str(archive))
    spec = ClassifierSpec(num_classes=10, input_size=32, output=ClassifierOutput.logits)
    worker = start_worker(settings, "nan")
    try:
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            uploaded = client.post(
                "/v1/classifiers",
                files={"archive": ("nan.pt", archive.read_bytes())},
                data={"spec": spec.model_dump_json()},
            )
            assert uploaded.status_code == 201, uploaded.text
            body = {
                "prompt": "a digit",
                "class_index": 1,
                "num_images": 2,
                "steps": 2,
                "guidance_every": 1,
                "criterion": "loss",
                "omega": 0.01,
                "classifier_id": uploaded.json()["classifier_id"],
            }
            # two jobs queued together: the worker runs them as one shared batch (issue 15), each checked
            batch = client.post("/v1/batches", json={"jobs": [body, dict(body, seed=5, omega=0.02)]})
            assert batch.status_code == 202, batch.text
            result = worker.dequeue_job_and_maintain_ttl(timeout=1)
            worker.execute_job(*result)

            for job_id in batch.json()["job_ids"]:
                stored = redis.Redis.from_url(redis_server, decode_responses=True).lrange(
                    f"{settings.redis_prefix}:results:{job_id}", 0, -1
                )
                results = [strict_json(entry) for entry in stored]
                answer = client.get(f"/v1/jobs/{job_id}")
                job = strict_json(answer.text)
                assert job["state"] == "finished", job
                for entry in (results, job["results"]):
                    assert len(entry) == 2
                    assert all(r["criterion_value"] is None and r["criterion_not_finite"] is True for r in entry)
                png = client.get(f"/v1/images/{results[0]['image_id']}").content
                metadata = strict_json(Image.open(io.BytesIO(png)).text["fgs"])
                assert metadata["criterion_value"] is None and metadata["criterion_not_finite"] is True
    finally:
        worker.register_death()
