"""Every split name the pipeline knows, and the two rules that pair them.

The names used to be spread over the schema, the request forget set, the stages
and the validation gate, each with its own copy of "forgetXX goes with
retain(100-XX)". They live here, once, so that a new split (or a new pairing)
is added in one place and every reader, writer and check agrees on it:

* the TOFU benchmark splits of the ``data`` stage: ``full``, ``forget01/05/10``,
  ``retain99/95/90``, ``forgetXX_perturbed``, ``retain_perturbed``,
  ``real_authors``, ``world_facts``, ``holdout01/05/10`` (authors no model trains on),
  plus the refusal strings ``idk``;
* the splits built from deletion requests: ``forget_requests``,
  ``retain_requests``, ``forget_requests_perturbed`` and the benchmark splits
  passed through unchanged (``real_authors``, ``world_facts``, ``retain_perturbed``).

:func:`retain_of`, :func:`perturbed_of` and :func:`holdout_of` are the pairing rules;
:data:`SPLIT_KINDS` says which row schema (:mod:`unlearn.data.schema`) each
split is held to. This module imports nothing from the data layer, so the
config (``DataCfg.retain_split``) can use it too.
"""

from __future__ import annotations

from typing import Literal

from ..errors import UserError

Kind = Literal["qa", "perturbed", "utility", "text", "verbmem", "knowmem"]
"""Row schema of a split: plain QA, QA with paraphrase + 5 perturbed answers, or a 3-option utility question
(TOFU); a raw article ``{id, text}``, a continuation prompt ``{id, prompt, gt}`` or a plain QA pair
``{id, question, answer}`` (MUSE)."""

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

HOLDOUT_SPLITS: tuple[str, ...] = tuple(f"holdout{pct}" for pct in FORGET_PCTS)
"""Authors no model ever trains on, as many as forgetXX has: the non-members of TOFU's privacy-leakage test."""

QA_SPLITS: tuple[str, ...] = (FULL, *TOFU_FORGET_SPLITS, *TOFU_RETAIN_SPLITS)
PERTURBED_SPLITS: tuple[str, ...] = (*(f"{f}_perturbed" for f in TOFU_FORGET_SPLITS), RETAIN_PERTURBED)
UTILITY_SPLITS: tuple[str, ...] = (REAL_AUTHORS, WORLD_FACTS)
SPLIT_NAMES: tuple[str, ...] = QA_SPLITS + PERTURBED_SPLITS + UTILITY_SPLITS + HOLDOUT_SPLITS
"""Every split of the benchmark dataset (``idk`` aside), in the order files and checks go through them."""

# --- MUSE (Shi et al. 2024): raw news articles and their evaluation sets ------------------------
MUSE_FOLDS: tuple[str, ...] = ("fold1", "fold2", "fold3", "fold4")
"""Four disjoint sets of articles (MUSE's sust/forget_1..4); fold1 is the forget set of the plain run."""
PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT = "privleak_forget", "privleak_retain", "privleak_holdout"
"""Articles for membership inference: forget (a subset of fold1), retain (always trained on), holdout (never)."""
VERBMEM_FORGET = "verbmem_forget"
"""Continuation prompts cut from forget articles, with their true continuation (``gt``)."""
KNOWMEM_FORGET, KNOWMEM_RETAIN = "knowmem_forget_qa", "knowmem_retain_qa"
KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN_ICL = "knowmem_forget_qa_icl", "knowmem_retain_qa_icl"
"""QA about forget / retain articles, and the few-shot examples prepended to each question."""
MUSE_SPLIT_NAMES: tuple[str, ...] = (
    *MUSE_FOLDS, PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT, VERBMEM_FORGET,
    KNOWMEM_FORGET, KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL,
)
"""Every split of a prepared MUSE dataset."""
MUSE_FORGET_SETS: tuple[str, ...] = ("fold1", "fold2", "fold3", "fold4", "fold1-2", "fold1-3", "fold1-4")
"""MUSE values of ``data.forget_split``: one fold (sustainability: fold k after folds 1..k-1) or a nested union of
folds (scalability: fold1, fold1-2, fold1-3). The retain text is every fold after the last one forgotten, plus
``privleak_retain``."""


def muse_folds(forget: str) -> list[str]:
    """The folds a MUSE forget set names: ``fold2`` -> [fold2], ``fold1-3`` -> [fold1, fold2, fold3]."""
    if forget not in MUSE_FORGET_SETS:
        raise UserError(f"unknown MUSE forget set {forget!r}; expected one of {', '.join(MUSE_FORGET_SETS)}")
    first, _, last = forget.removeprefix("fold").partition("-")
    return [f"fold{i}" for i in range(int(first), int(last or first) + 1)]


def muse_retain_folds(forget: str) -> list[str]:
    """The folds a MUSE run keeps (retain text besides ``privleak_retain``): every fold after the last forgotten.

    Earlier folds are left out: in a sustainability sequence they were forgotten by an earlier request.
    """
    last = int(muse_folds(forget)[-1].removeprefix("fold"))
    return [f for f in MUSE_FOLDS if int(f.removeprefix("fold")) > last]


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
    **{name: "qa" for name in HOLDOUT_SPLITS},
    **{name: "text" for name in (*MUSE_FOLDS, PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT)},
    VERBMEM_FORGET: "verbmem",
    **{name: "knowmem" for name in (KNOWMEM_FORGET, KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL)},
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
    if forget in MUSE_FORGET_SETS:  # MUSE: the text kept, named by its parts ("fold2+fold3+fold4+privleak_retain")
        return "+".join([*muse_retain_folds(forget), PRIVLEAK_RETAIN])
    _check_forget(forget)
    return _RETAIN_OF[forget]


def holdout_of(forget: str) -> str | None:
    """The non-member split paired with ``forget`` (``forget10`` -> ``holdout10``); None for ``forget_requests``.

    TOFU's privacy-leakage test compares forgetXX with holdoutXX, as many authors as
    forgetXX, none of them in ``full``; a request forget set has no such counterpart.
    """
    _check_forget(forget)
    return f"holdout{forget.removeprefix('forget')}" if forget in TOFU_FORGET_SPLITS else None


def perturbed_of(forget: str) -> str:
    """The split holding ``forget``'s rows with paraphrases and perturbed answers (``forget10`` -> ``forget10_perturbed``)."""
    _check_forget(forget)
    return f"{forget}_perturbed"
