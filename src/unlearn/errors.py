"""The one base class for everything a user can get wrong.

A bad ``params.yaml`` or ``--set`` override (:class:`~unlearn.config.ConfigError`),
bad data (:class:`~unlearn.data.schema.DataError`), a bad deletion request
(:class:`~unlearn.requests.ledger.RequestError`), a missing or tampered input:
each is the user's to fix, not a bug, so the CLI prints its message on one line
and exits with code 2 instead of showing a traceback. They all derive from
:class:`UserError`, so that handler (``unlearn.cli_common.friendly_errors``)
names one class and imports only this module, instead of reaching up into the
config, data and ledger layers for their error types.

This module imports nothing from the project: every layer may import it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input the user can fix: bad parameters, data, requests or missing inputs; the message says what and where.

    A ``ValueError`` because each of these is "a value that is not acceptable",
    and code that already catches ``ValueError`` keeps working.
    """
