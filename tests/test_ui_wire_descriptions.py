"""Every field of every wire model says what it is: /docs and /redoc show these descriptions."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from pydantic import BaseModel

from fgs_common import wire

FAMILIES = [importlib.import_module(f"{wire.__name__}.{info.name}") for info in pkgutil.iter_modules(wire.__path__)]


def test_every_family_is_found():
    assert {m.__name__.rsplit(".", 1)[1] for m in FAMILIES} >= {"generation", "jobs", "batches", "uploads", "views"}


@pytest.mark.parametrize("module", FAMILIES, ids=lambda m: m.__name__)
def test_every_wire_field_has_a_description(module):
    models = [
        m
        for m in vars(module).values()
        if inspect.isclass(m) and issubclass(m, BaseModel) and m.__module__ == module.__name__
    ]
    assert len(models) >= 2
    missing = [
        f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items() if not field.description
    ]
    assert missing == []
