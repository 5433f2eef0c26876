"""A third party's generated client works as it is: openapi-python-client (the dev extra) generates a client from
the live /openapi.json, and that code alone uploads an image and a classifier, submits a guided job, waits on it and
downloads its PNG (the session's live uvicorn and workers on the tiny model)."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from support.live_calls import png_bytes
from support.tiny_classifier import TinyClassifier

PACKAGE = "fgs_generated_client"
# What the OpenAPI description's "Generated clients" section tells generators that read only octet-stream.
CONFIG = f"""\
package_name_override: {PACKAGE}
project_name_override: fgs-generated-client
content_type_overrides:
  image/png: application/octet-stream
  image/webp: application/octet-stream
"""


def generate_client(base_url: str, directory: Path):
    """The generated package, imported; fails on any generator warning (an endpoint or type it skipped)."""
    binary = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("openapi-python-client is not installed (the dev extra: pip install -e '.[dev]')")
    (directory / "openapi.json").write_bytes(httpx.get(f"{base_url}/openapi.json").content)
    (directory / "config.yaml").write_text(CONFIG)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [binary, "generate", "--path", "openapi.json", "--config", "config.yaml", "--meta", "none"]
        + ["--output-path", PACKAGE],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Warning" not in output, output
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(directory))


def test_a_generated_client_uploads_generates_waits_and_downloads(live_stack, tmp_path):
    stack = live_stack  # the session's stack: this test needs nothing of its own
    generated = generate_client(stack.base_url, tmp_path)
    api = importlib.import_module(f"{PACKAGE}.api")
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    for name in ("images.upload_image", "images.download_image", "classifiers.upload_classifier"):
        importlib.import_module(f"{api.__name__}.{name}")
    importlib.import_module(f"{api.__name__}.generate.generate")
    importlib.import_module(f"{api.__name__}.jobs.get_job")
    client = generated.AuthenticatedClient(
        base_url=stack.base_url, token=stack.keys["alpha"], raise_on_unexpected_status=True, timeout=httpx.Timeout(60)
    )

    image = api.images.upload_image.sync(
        client=client,
        body=models.BodyUploadImage(file=types.File(payload=io.BytesIO(png_bytes()), file_name="digit.png")),
    )
    assert isinstance(image, models.ImageUploaded), image
    archive = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyClassifier().eval()), archive)
    archive.seek(0)
    classifier = api.classifiers.upload_classifier.sync(
        client=client,
        body=models.BodyUploadClassifier(
            archive=types.File(payload=archive, file_name="tiny.pt"),
            spec=json.dumps({"num_classes": 2, "input_size": 8, "output": "logits_embedding"}),
        ),
    )
    assert isinstance(classifier, models.ClassifierUploaded), classifier

    accepted = api.generate.generate.sync(
        client=client,
        body=models.GenerateRequest(
            prompt="a photo of digit one",
            class_index=1,
            conditioning_image_ids=[image.image_id],
            classifier_id=classifier.classifier_id,
            criterion=models.Criterion.ENTROPY,
            omega=0.1,
            steps=2,
            guidance_every=1,
            num_images=2,
            seed=7,
        ),
    )
    assert isinstance(accepted, models.JobAccepted), accepted
    deadline = time.time() + 180
    while True:
        job = api.jobs.get_job.sync(job_id=accepted.job_id, client=client)
        assert isinstance(job, models.JobPublic), job
        if job.state in (models.JobState.FINISHED, models.JobState.FAILED, models.JobState.CANCELED):
            break
        assert time.time() < deadline, job
        time.sleep(0.5)
    assert job.state is models.JobState.FINISHED, job
    assert [result.seed for result in job.results] == [7, 8]

    png = api.images.download_image.sync(image_id=job.results[0].image_id, client=client)
    assert isinstance(png, types.File), png
    data = png.payload.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as decoded:
        assert json.loads(decoded.text["fgs"])["seed"] == 7  # its provenance, as the description says
