"""Quiet logs by default: library INFO lines (accelerate's checkpointing, mlflow...) stay out of the console,
the project's own messages stay in; --verbose / UNLEARN_VERBOSE brings the libraries back."""

from __future__ import annotations

import logging

from typer.testing import CliRunner

from unlearn import cli


def test_library_info_is_quiet_and_ours_is_not():
    import mlflow  # noqa: F401  (mlflow sets its own logger to INFO on import: the quiet default must win)

    cli.configure_logging(False)
    assert not logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
    assert not logging.getLogger("mlflow.store").isEnabledFor(logging.INFO)
    assert logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.WARNING)
    assert logging.getLogger("unlearn.train").isEnabledFor(logging.INFO)
    assert not logging.getLogger("unlearn.train").isEnabledFor(logging.DEBUG)


def test_the_tied_weights_note_is_dropped_but_other_warnings_stay(caplog):
    cli.configure_logging(False)
    log = logging.getLogger("accelerate.utils.other")
    with caplog.at_level(logging.WARNING, logger="accelerate.utils.other"):
        log.warning("[RANK 0] Removed shared tensor {'lm_head.weight'} while saving.")
        log.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_verbose_brings_library_info_back():
    try:
        cli.configure_logging(True)
        assert logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
        assert logging.getLogger("unlearn.train").isEnabledFor(logging.DEBUG)
    finally:
        cli.configure_logging(False)


def test_the_flag_and_the_environment_variable_reach_the_setting(monkeypatch):
    runner = CliRunner()
    runner.invoke(cli.app, ["--verbose", "params", "seed"])
    assert cli._VERBOSE["on"] is True
    runner.invoke(cli.app, ["params", "seed"])
    assert cli._VERBOSE["on"] is False
    monkeypatch.setenv("UNLEARN_VERBOSE", "1")
    runner.invoke(cli.app, ["params", "seed"])
    assert cli._VERBOSE["on"] is True
    cli._VERBOSE["on"] = False
