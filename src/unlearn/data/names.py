"""Every split name the pipeline knows, and the two rules that pair them.

The names used to be spread over the schema, the request forget set, the stages
and the validation gate, each with its own copy of "forgetXX goes with
retain(100-XX)". They live here, once, so that a new split (or a new pairing)
is added in one place and every reader, writer and check agrees on it:

* the TOFU benchmark splits of the ``data`` stage: ``full``, ``forget01/05/10``,
  ``retain99/95/90``, ``forgetXX_perturbed``, ``retain_perturbed``,
  ``real_authors``, ``world_facts``, plus the refusal strings ``idk``;
* the splits built from deletion requests: ``forget_requests``,
  ``retain_requests``, ``forget_requests_perturbed`` and the benchmark splits
  passed through unchanged (``real_authors``, ``world_facts``, ``retain_perturbed``).

:func:`retain_of` and :func:`perturbed_of` are the pairing rules;
:data:`SPLIT_KINDS` says which row schema (:mod:`unlearn.data.schema`) each
split is held to. This module imports nothing from the data layer, so the
config (``DataCfg.retain_split``) can use it too.
"""

from __future__ import annotations

from typing import Literal

from ..errors import UserError

Kind = Literal["qa", "perturbed", "utility"]
"""Row schema of a split: plain QA, QA with paraphrase + 5 perturbed answers, or a 3-option utility question."""

# --- the TOFU benchmark ------------------------------------------------------------------------
FULL = "full"
FORGET_PCTS: tuple[str, ...] = ("01", "05", "10")
TOFU_FORGET_SPLITS: tuple[str, ...] = tuple(f"forget{pct}" for pct in FORGET_PCTS)
TOFU_RETAIN_SPLITS: tuple[str, ...] = tuple(f"retain{100 - int(pct)}" for pct in FORGET_PCTS)
RETAIN_PERTURBED = "retain_perturbed"
REAL_AUTHORS = "real_authors"
WORLD_FACTS = "world_facts"
IDK = "idk"
"""Not a split of rows: the refusal strings of DPO-IdK, written next to the splits as ``idk.json``."""

QA_SPLITS: tuple[str, ...] = (FULL, *TOFU_FORGET_SPLITS, *TOFU_RETAIN_SPLITS)
PERTURBED_SPLITS: tuple[str, ...] = (*(f"{f}_perturbed" for f in TOFU_FORGET_SPLITS), RETAIN_PERTURBED)
UTILITY_SPLITS: tuple[str, ...] = (REAL_AUTHORS, WORLD_FACTS)
SPLIT_NAMES: tuple[str, ...] = QA_SPLITS + PERTURBED_SPLITS + UTILITY_SPLITS
"""Every split of the benchmark dataset (``idk`` aside), in the order files and checks go through them."""

# --- splits built from deletion requests -------------------------------------------------------
FORGET_REQUESTS = "forget_requests"
RETAIN_REQUESTS = "retain_requests"
FORGET_REQUESTS_PERTURBED = "forget_requests_perturbed"
REQUEST_PASS_THROUGH: tuple[str, ...] = (RETAIN_PERTURBED, REAL_AUTHORS, WORLD_FACTS)
"""Benchmark splits a request split set carries over (retain_perturbed minus the requested authors)."""
REQUEST_SPLIT_NAMES: tuple[str, ...] = (FORGET_REQUESTS, RETAIN_REQUESTS, FORGET_REQUESTS_PERTURBED, *REQUEST_PASS_THROUGH)
"""Every split a request split set may hold."""
REQUIRED_REQUEST_SPLITS: tuple[str, ...] = (FORGET_REQUESTS, RETAIN_REQUESTS)
"""A request split set without these is not one; the others are present only when their rows exist."""

# --- all of them -------------------------------------------------------------------------------
FORGET_SPLITS: tuple[str, ...] = (*TOFU_FORGET_SPLITS, FORGET_REQUESTS)
"""Splits that can be ``data.forget_split``: their manifest entries carry the forget-set hash."""
ALL_SPLIT_NAMES: tuple[str, ...] = SPLIT_NAMES + (FORGET_REQUESTS, RETAIN_REQUESTS, FORGET_REQUESTS_PERTURBED)
"""Every split of rows, benchmark first, in the one order validation goes through them."""

SPLIT_KINDS: dict[str, Kind] = {
    **{name: "qa" for name in QA_SPLITS},
    **{name: "perturbed" for name in PERTURBED_SPLITS},
    **{name: "utility" for name in UTILITY_SPLITS},
    FORGET_REQUESTS: "qa",
    RETAIN_REQUESTS: "qa",
    FORGET_REQUESTS_PERTURBED: "perturbed",
}

_RETAIN_OF: dict[str, str] = {**dict(zip(TOFU_FORGET_SPLITS, TOFU_RETAIN_SPLITS)), FORGET_REQUESTS: RETAIN_REQUESTS}


def _check_forget(forget: str) -> None:
    if forget not in _RETAIN_OF:
        raise UserError(f"unknown forget split {forget!r}; expected one of {', '.join(FORGET_SPLITS)}")


def retain_of(forget: str) -> str:
    """The retain split paired with ``forget``: ``forget10`` -> ``retain90``, ``forget_requests`` -> ``retain_requests``.

    TOFU's retainXX is the complement of forget(100-XX); a request split set
    pairs up by name. This is the only place the rule is written down
    (``DataCfg.retain_split`` calls it).
    """
    _check_forget(forget)
    return _RETAIN_OF[forget]


def perturbed_of(forget: str) -> str:
    """The split holding ``forget``'s rows with paraphrases and perturbed answers (``forget10`` -> ``forget10_perturbed``)."""
    _check_forget(forget)
    return f"{forget}_perturbed"
