"""One name per id across the wire (issue 23): the OpenAPI document is walked, every schema and every path and query
parameter, so that what an upload answers is what a request takes, under the same name.

The names come from the paths: `/v1/images/{image_id}` makes `image_id` the image's id. Then no field is a bare
`id`; every `..._id` / `..._ids` names an entity the paths know (`conditioning_image_ids`: images); and what a
collection's routes answer names its own id as its path does (`POST /v1/images` answers `image_id`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fgs_service.app import create_app
from support.service_settings import service_settings

ITEM_PATH = re.compile(r"^/v1/(?P<collection>[a-z_]+)/\{(?P<param>\w+)\}")
ID_FIELD = re.compile(r"^(?:\w+_)?(?P<entity>[a-z]+)_ids?$")
SUCCESS = re.compile(r"^2\d\d$")


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    """The document /openapi.json serves, built in process (no Redis is reached to build it)."""
    settings = service_settings("redis://127.0.0.1:1", Path(tmp_path_factory.mktemp("openapi-ids")))
    return create_app(settings).openapi()


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, by_method in document["paths"].items():
        for method, operation in by_method.items():
            yield path, method.upper(), operation


def id_params(document: dict) -> dict[str, set[str]]:
    """Collection -> the names its item paths give the item's id (`jobs` -> {`job_id`})."""
    names: dict[str, set[str]] = {}
    for path in document["paths"]:
        if match := ITEM_PATH.match(path):
            names.setdefault(match["collection"], set()).add(match["param"])
    return names


def fields(document: dict) -> Iterator[tuple[str, str]]:
    """(where, name) of every schema property and every path and query parameter."""
    for schema_name, schema in document["components"]["schemas"].items():
        for name in schema.get("properties", {}):
            yield schema_name, name
    for path, method, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] in ("path", "query"):
                yield f"{method} {path}", parameter["name"]


def component(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def represented(document: dict, schema: dict, collection: str) -> dict | None:
    """The model a collection's route answers with: the object itself, or the items of a list or of a page that
    holds them under the collection's name (JobsPublic.jobs); None when it answers something else."""
    schema = component(document, schema)
    if schema.get("type") == "array":
        return represented(document, schema["items"], collection)
    page = schema.get("properties", {}).get(collection, {})
    if page.get("type") == "array" and "$ref" in page.get("items", {}):
        return component(document, page["items"])
    return schema if "properties" in schema else None


def id_name_problems(document: dict) -> list[str]:
    """Every place where an id is named otherwise than by its one name; [] when the names are consistent."""
    params = id_params(document)
    problems = [f"{c}: its item is named {sorted(n)} in its paths" for c, n in params.items() if len(n) > 1]
    entities = {name[: -len("_id")] for names in params.values() for name in names if name.endswith("_id")}
    for where, name in fields(document):
        if name == "id":
            problems.append(f"{where}.id: a bare `id`; name it after its entity ({', '.join(sorted(entities))})")
        elif (match := ID_FIELD.match(name)) and match["entity"] not in entities:
            problems.append(f"{where}.{name}: no path names a `{match['entity']}_id`")
    own_id = {}  # a collection's routes -> (collection, the id its path names)
    for collection, names in params.items():
        for name in sorted(names):
            own_id[f"/v1/{collection}"] = own_id[f"/v1/{collection}/{{{name}}}"] = (collection, name)
    for path, method, operation in operations(document):
        if path not in own_id:
            continue  # not a collection's own route: a sub-resource (/events), or no collection (/v1/generate)
        collection, name = own_id[path]
        for status, response in operation["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            model = represented(document, schema, collection) if SUCCESS.match(status) and schema else None
            if model is not None and name not in model["properties"]:
                problems.append(f"{method} {path} {status}: {model.get('title')} does not name its id `{name}`")
    return problems


def test_every_id_has_one_name_across_the_wire(document):
    assert id_params(document) == {
        "images": {"image_id"},
        "classifiers": {"classifier_id"},
        "batches": {"batch_id"},
        "jobs": {"job_id"},
        "presets": {"name"},
    }
    assert id_name_problems(document) == []


def test_the_uploads_answer_the_names_requests_take(document):
    """What issue 23 found: an upload answered `id` while a job takes `classifier_id` and `conditioning_image_ids`."""
    schemas = document["components"]["schemas"]
    assert "image_id" in schemas["ImageUploaded"]["properties"]
    assert "classifier_id" in schemas["ClassifierUploaded"]["properties"]
    assert {"classifier_id", "conditioning_image_ids"} <= set(schemas["GenerateRequest"]["properties"])


def test_the_check_finds_a_bare_id_and_a_second_name(document):
    """The checks can fail: an upload answering `id` again, a path naming the image `{id}`, a field naming an
    entity no path knows."""
    doctored = copy.deepcopy(document)
    uploaded = doctored["components"]["schemas"]["ImageUploaded"]["properties"]
    uploaded["id"] = uploaded.pop("image_id")
    doctored["paths"]["/v1/images/{id}/thumbnail"] = doctored["paths"]["/v1/images/{image_id}/thumbnail"]
    doctored["components"]["schemas"]["JobAccepted"]["properties"]["task_id"] = {"type": "string"}
    problems = id_name_problems(doctored)
    assert "images: its item is named ['id', 'image_id'] in its paths" in problems
    assert any(p.startswith("ImageUploaded.id: a bare `id`") for p in problems)
    assert "JobAccepted.task_id: no path names a `task_id`" in problems
    assert "POST /v1/images 201: ImageUploaded does not name its id `image_id`" in problems
