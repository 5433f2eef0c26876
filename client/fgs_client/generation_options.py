"""`fgs-client` flags for the generation parameters, derived from `GenerationParams` (the one definition).

A command decorated with `@generation_options(on_invalid)` gets one `--flag` per field of GenerationParams (name, type,
default and help from the field) and `--preset NAME` (common/fgs_common/presets.py), and receives them validated
as a single `generation: GenerationParams` argument (and, if it declares `choice: GenerationChoice`, where each
value came from). Flags given on the command line override the preset; the preset overrides the defaults. A
parameter added to the wire model shows up in every such command's `--help` with no edit here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_type_hints

import typer
from pydantic import ValidationError

from fgs_common.presets import PRESETS, Preset, get_preset
from fgs_common.wire import GenerationParams

PANEL = "Generation (GenerationParams; the same names in the HTTP API)"


def validation_message(error: ValidationError) -> str:
    """The problems in one line, each named by its flag and its API field."""
    problems = []
    for e in error.errors():
        field = ".".join(map(str, e["loc"]))
        problems.append(f"--{field.replace('_', '-')} ({field}): {e['msg']}" if field else e["msg"])
    return "invalid generation settings: " + "; ".join(problems)


@dataclass(frozen=True)
class GenerationChoice:
    """The parameters a command runs with, the preset they started from and the flags given explicitly."""

    params: GenerationParams
    preset: Preset | None
    explicit: frozenset[str]  # the command's parameters given on the command line or by environment, not defaulted

    def source(self, name: str) -> str:
        """Where the value of field `name` comes from."""
        if name in self.explicit:
            return "--" + name.replace("_", "-") + " (given)"
        if self.preset is not None and name in self.preset.params:
            return f"preset {self.preset.name}: {self.preset.params[name].source}"
        # the module whose comments give each default's source, as a path inside the installed package
        return f"default ({GenerationParams.__module__.replace('.', '/')}.py)"


def given_parameters(ctx: typer.Context) -> frozenset[str]:
    """The command's parameters the user gave (command line or environment), as click records their source."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.add(name)
    return frozenset(given)


def _flag_parameter(name: str) -> inspect.Parameter:
    field = GenerationParams.model_fields[name]
    option = typer.Option("--" + name.replace("_", "-"), help=field.description, rich_help_panel=PANEL)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=Annotated[field.annotation, option]
    )


def generation_options(
    on_invalid: Callable[[str], BaseException], exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace the command's `generation: GenerationParams` parameter by one flag per field.

    Invalid values raise what `on_invalid(message)` returns (the CLI's own error exit). Fields in `exclude` get
    no flag (a command that sweeps them declares its own); they keep the preset's value or the default.
    """
    return functools.partial(_with_generation_flags, on_invalid=on_invalid, exclude=exclude)


def _with_generation_flags(
    command: Callable[..., Any], on_invalid: Callable[[str], BaseException], exclude: tuple[str, ...] = ()
) -> Callable[..., Any]:
    hints = get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(command).parameters.values()
        if p.name != "generation"
    ]
    wants_choice = "choice" in inspect.signature(command).parameters
    own = [p for p in own if p.name != "choice"]
    preset_option = typer.Option(
        "--preset",
        help=f"start from a named setting ({', '.join(PRESETS)}); flags given override it",
        rich_help_panel=PANEL,
    )
    fields = [name for name in GenerationParams.model_fields if name not in exclude]
    flags = [_flag_parameter(name) for name in fields] + [
        inspect.Parameter(
            "preset", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, preset_option]
        ),
        inspect.Parameter("generation_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
    ]

    @functools.wraps(command)
    def with_generation(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in fields}
        preset_name = kwargs.pop("preset")
        explicit = given_parameters(kwargs.pop("generation_ctx"))
        try:
            preset = get_preset(preset_name) if preset_name is not None else None
        except KeyError as error:
            raise on_invalid(str(error.args[0])) from None
        try:
            if preset is None:
                generation = GenerationParams(**values)
            else:
                generation = preset.generation_params({name: values[name] for name in explicit if name in values})
        except ValidationError as error:
            raise on_invalid(validation_message(error)) from None
        if wants_choice:
            kwargs["choice"] = GenerationChoice(generation, preset, explicit)
        return command(generation=generation, **kwargs)

    with_generation.__signature__ = inspect.Signature(own + flags)  # type: ignore[attr-defined]
    return with_generation
