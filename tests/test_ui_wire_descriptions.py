"""Every field of every wire model says what it is: /docs and /redoc show these descriptions."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

from fgs_common import wire, wire_views


@pytest.mark.parametrize("module", [wire, wire_views], ids=lambda m: m.__name__)
def test_every_wire_field_has_a_description(module):
    models = [
        m
        for m in vars(module).values()
        if inspect.isclass(m) and issubclass(m, BaseModel) and m.__module__ == module.__name__
    ]
    assert len(models) >= 5
    missing = [
        f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items() if not field.description
    ]
    assert missing == []
