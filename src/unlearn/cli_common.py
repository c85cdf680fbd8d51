"""What every ``unlearn`` subcommand shares: the --params/--set options and friendly errors."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="parameters file (see params.yaml for every knob)")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override one parameter, e.g. --set method.name=npo (repeatable)"),
]


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (bad params, data, requests, missing files), not by a bug."""
    from .config import ConfigError
    from .data.schema import DataError
    from .requests.ledger import RequestError

    return (ConfigError, DataError, RequestError, FileNotFoundError)


def friendly_errors(fn):
    """Known error kinds become one clear message on stderr and exit code 2 (no traceback wall)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except known_errors() as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper
