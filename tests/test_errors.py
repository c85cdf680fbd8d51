"""One base for what a user can get wrong (unlearn.errors.UserError), and the CLI's one way of reporting it."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from unlearn.cli_common import friendly_errors
from unlearn.config import ConfigError
from unlearn.data.schema import DataError
from unlearn.data.splits import SplitFileError
from unlearn.data.validate import ValidationFailed
from unlearn.errors import UserError
from unlearn.requests.inbox import InboxError
from unlearn.requests.ledger import RequestError, TransitionError


@pytest.mark.parametrize(
    "kind", [ConfigError, DataError, SplitFileError, ValidationFailed, RequestError, TransitionError, InboxError]
)
def test_every_error_kind_is_a_user_error(kind):
    assert issubclass(kind, UserError) and issubclass(kind, ValueError)


def _app(error: BaseException) -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @app.command()
    @friendly_errors
    def run() -> None:
        raise error

    return app


@pytest.mark.parametrize(
    "error, line",
    [
        (ConfigError("override 'x': expected KEY=VALUE"), "error: override 'x': expected KEY=VALUE"),
        (DataError("expected a non-empty string", file="full.json", row=3, field="answer"),
         "error: full.json, row 3, field 'answer': expected a non-empty string"),
        (RequestError("subject_type: expected 'author' or 'rows'"), "error: subject_type: expected 'author' or 'rows'"),
        (UserError("bad input"), "error: bad input"),
        (FileNotFoundError("no splits in data/tofu"), "error: no splits in data/tofu"),
    ],
)
def test_cli_turns_a_user_error_into_exit_code_2_and_one_line(error, line):
    result = CliRunner().invoke(_app(error), [])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [line]
    assert "Traceback" not in result.output


def test_a_bug_is_not_a_user_error():
    result = CliRunner().invoke(_app(KeyError("oops")), [])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_a_real_subcommand_reports_a_bad_override_in_one_line(tmp_path, monkeypatch):
    from unlearn.requests.cli import request_app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(request_app, ["list", "--params", str(tmp_path / "params.yaml"), "--set", "novalue"])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: override 'novalue'"), result.output
