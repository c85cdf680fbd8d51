"""What every ``unlearn`` subcommand shares: the --params/--set options and friendly errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from .errors import UserError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="parameters file (`unlearn params` lists every knob)")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override one parameter, e.g. --set method.name=npo (repeatable)"),
]

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
"""Errors caused by the user's input (bad params, data, requests, missing files), not by a bug.

:class:`~unlearn.errors.UserError` is the base of every such error the project
raises; FileNotFoundError is the standard library's "a required input is missing".
"""

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Known error kinds become one clear message on stderr and exit code 2 (no traceback wall).

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
