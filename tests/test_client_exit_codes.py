"""`fgs-client` exits by error type through one table (fgs_client.cli.EXIT_CODES): input the user can fix exits 2
with its message; a ValueError from a bug (a pydantic ValidationError) is no bad input and shows its traceback."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError
from typer.main import get_command
from typer.testing import CliRunner

from fgs_client import cli
from fgs_client.balance_planner import PlanError
from fgs_client.balance_state import StateConflict
from fgs_client.dataset_readers import DatasetError
from fgs_client.http_client import ApiError
from fgs_common.exceptions import InvalidClassifier, InvalidJob, UserInputError
from fgs_common.wire import GenerationParams

runner = CliRunner()


def test_the_client_errors_are_user_input_errors_and_no_value_errors():
    for kind in (DatasetError, PlanError, StateConflict, InvalidJob, InvalidClassifier):
        assert issubclass(kind, UserInputError) and not issubclass(kind, ValueError), kind
    assert not issubclass(ValidationError, UserInputError)


@pytest.fixture
def commands() -> typer.Typer:
    """An app made like fgs-client's own (its command group), with commands that fail in known ways."""
    assert isinstance(get_command(cli.app), cli._Commands)
    app = typer.Typer(cls=cli._Commands)

    @app.command()
    def dataset() -> None:
        raise DatasetError("no such dataset root: /nowhere")

    @app.command()
    def bug() -> None:
        GenerationParams(omega=float("nan"))  # a ValidationError, which is a ValueError

    @app.command()
    def balance() -> None:  # a resumable command's name: the message says how to go on
        raise ApiError(409, "conflict", "busy")

    return app


def test_a_user_error_exits_2_with_its_message_and_a_bug_does_not(commands):
    result = runner.invoke(commands, ["dataset"])
    assert result.exit_code == cli.EXIT_BAD_INPUT == 2
    assert "error: no such dataset root: /nowhere" in result.output

    result = runner.invoke(commands, ["bug"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValidationError)  # raised as it is: Python prints its traceback

    result = runner.invoke(commands, ["balance"])
    assert result.exit_code == cli.EXIT_API
    assert "the service refused a request: 409 conflict: busy. Rerun the same command to resume." in result.output


def test_fgs_client_maps_a_bad_dataset_root_and_a_bad_spec_to_exit_2(tmp_path):
    missing = tmp_path / "missing"
    result = runner.invoke(cli.app, ["balance", "--dataset", "imagefolder", "--root", str(missing), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert str(missing) in " ".join(result.output.split())

    archive, spec = tmp_path / "clf.pt", tmp_path / "spec.json"
    archive.write_bytes(b"not read: the spec is refused first")
    spec.write_text('{"num_classes": "many"}')
    result = runner.invoke(cli.app, ["upload-classifier", "--classifier", str(archive), "--spec", str(spec)])
    assert result.exit_code == 2, result.output
    assert "cannot read the classifier spec" in " ".join(result.output.split())
