"""`fgs-client` flags for the generation parameters, derived from `GenerationParams` (the one definition).

A command decorated with `@generation_options(on_invalid)` gets one `--flag` per field of GenerationParams (name, type,
default and help from the field) and receives them validated as a single `generation: GenerationParams`
argument. A parameter added to the wire model shows up in every such command's `--help` with no edit here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, get_type_hints

import typer
from pydantic import ValidationError

from fgs_common.wire import GenerationParams

PANEL = "Generation (GenerationParams; the same names in the HTTP API)"


def validation_message(error: ValidationError) -> str:
    """The problems in one line, each named by its flag and its API field."""
    problems = []
    for e in error.errors():
        field = ".".join(map(str, e["loc"]))
        problems.append(f"--{field.replace('_', '-')} ({field}): {e['msg']}" if field else e["msg"])
    return "invalid generation settings: " + "; ".join(problems)


def _flag_parameter(name: str) -> inspect.Parameter:
    field = GenerationParams.model_fields[name]
    option = typer.Option("--" + name.replace("_", "-"), help=field.description, rich_help_panel=PANEL)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=Annotated[field.annotation, option]
    )


def generation_options(on_invalid: Callable[[str], BaseException]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace the command's `generation: GenerationParams` parameter by one flag per field.

    Invalid values raise what `on_invalid(message)` returns (the CLI's own error exit).
    """
    return functools.partial(_with_generation_flags, on_invalid=on_invalid)


def _with_generation_flags(command: Callable[..., Any], on_invalid: Callable[[str], BaseException]) -> Callable[..., Any]:
    hints = get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(command).parameters.values()
        if p.name != "generation"
    ]
    flags = [_flag_parameter(name) for name in GenerationParams.model_fields]

    @functools.wraps(command)
    def with_generation(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in GenerationParams.model_fields}
        try:
            generation = GenerationParams(**values)
        except ValidationError as error:
            raise on_invalid(validation_message(error)) from None
        return command(generation=generation, **kwargs)

    with_generation.__signature__ = inspect.Signature(own + flags)  # type: ignore[attr-defined]
    return with_generation
