"""What /openapi.json says beyond the routes, so that a generated client works as it is: the workflow, short
operation ids, upload fields typed as binary files, image responses with a binary schema.

Checked with a real generator (openapi-python-client) in tests/test_service_openapi_client.py.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

DESCRIPTION = """\
fgs generates labelled images for the rare classes of a dataset with feedback-guided diffusion
(Askari-Hemmat et al., TMLR 2024): a team's own classifier steers each image towards its class.

## Workflow
1. **Upload** what the jobs refer to. A conditioning image: `POST /v1/images` (multipart field `file`) answers
   `ImageUploaded` whose `image_id` goes into `conditioning_image_ids`. For feedback guidance, your classifier:
   `POST /v1/classifiers` (multipart: `archive`, a TorchScript `.pt` or torch.export `.pt2`; `spec`, a
   `ClassifierSpec` as JSON; optionally `hardness_stats`) answers `ClassifierUploaded` whose `classifier_id` goes
   into the request's `classifier_id`.
2. **Generate**: `POST /v1/generate` with a `GenerateRequest` answers 202 with a `job_id`; many jobs at once,
   all or nothing: `POST /v1/batches`. An `Idempotency-Key` header makes a retried POST return the first jobs.
3. **Watch**: `GET /v1/jobs/{job_id}` until `state` is `finished`, `failed` or `canceled`, or follow the
   server-sent events of `GET /v1/jobs/{job_id}/events` (progress, then the whole job).
4. **Download**: each of the job's `results[i].image_id` at `GET /v1/images/{image_id}`: a PNG whose `fgs` text
   chunk holds the request, seed, model and criterion value.

Each id has one name wherever it appears, in bodies, paths and queries: `image_id`, `classifier_id`, `job_id`,
`batch_id` (a list of them: `job_ids`, `conditioning_image_ids`). Every call but the health checks takes
`Authorization: Bearer <API key>`. Errors are
`{"error": {"code": ..., "message": ...}}`: the message says what to fix.

## Generated clients
Operation ids are the short names (`upload_image`, `upload_classifier`, `generate`, `get_job`,
`download_image`, ...). Image responses are `image/png` (`download_image`) and `image/webp` (thumbnails) with a
binary schema; a generator that only knows `application/octet-stream` is told to read them as such
(openapi-python-client: `content_type_overrides: {image/png: application/octet-stream, image/webp:
application/octet-stream}`).
"""

BINARY = {"type": "string", "format": "binary"}


def operation_id(route: APIRoute) -> str:
    """The route function's name (`generate`, `get_job`, `upload_classifier`): stable, and what generated clients
    name their functions after (FastAPI's default appends path and method: `generate_v1_generate_post`)."""
    return route.name


def _type_file_fields(schema: dict) -> None:
    """OpenAPI 3.1 says a file with `contentMediaType` alone; generators (openapi-python-client 0.29) read a file
    from `format: binary` and otherwise send text, which the API refuses (422)."""
    if schema.get("type") == "string" and "contentMediaType" in schema:
        schema["format"] = "binary"
    for option in schema.get("anyOf", []):  # an optional file: anyOf [file, null]
        _type_file_fields(option)


def typed_for_generators(document: dict) -> dict:
    """`document` (FastAPI's OpenAPI) with binary uploads and image responses typed, in place."""
    for component in document.get("components", {}).get("schemas", {}).values():
        for field in component.get("properties", {}).values():
            _type_file_fields(field)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                for content_type, media in response.get("content", {}).items():
                    if content_type.startswith("image/"):
                        media.setdefault("schema", dict(BINARY))
    return document


def install(app: FastAPI) -> None:
    """Serve the typed document at /openapi.json (built once, as FastAPI caches its own)."""
    build = app.openapi

    def openapi() -> dict:
        return typed_for_generators(build())

    app.openapi = openapi
