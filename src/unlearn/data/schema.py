"""The row schema every TOFU split is held to, and the error every bad input raises.

All three sources (synthetic, local files, the hub) are funnelled through
:func:`validate_rows` / :func:`validate_splits`, so downstream stages can rely on
one shape::

    {"id": str, "author_id": str, "question": str, "answer": str,
     "paraphrased_answer": str | None, "perturbed_answer": list[str] | None}

Errors are :class:`DataError` and always say *where* (file, row, field) and *what
was expected*, because a data problem found at evaluation time, hours into a
pipeline, is far more expensive than one found while reading the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import UserError
from .names import (
    ALL_SPLIT_NAMES,
    FORGET_PCTS,
    FORGET_SPLITS,
    FULL,
    HOLDOUT_SPLITS,
    IDK,
    PERTURBED_SPLITS,
    QA_SPLITS,
    RETAIN_PERTURBED,
    SPLIT_KINDS,
    SPLIT_NAMES,
    TOFU_FORGET_SPLITS,
    UTILITY_SPLITS,
    Kind,
    perturbed_of,
    retain_of,
)
from .names import (  # MUSE (validate_muse_split_set below)
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN_ICL,
    MUSE_FOLDS,
    MUSE_SPLIT_NAMES,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    PRIVLEAK_RETAIN,
)

# The split names are defined in .names; they are re-exported here for the modules that always took them from here.
__all__ = [
    "FORGET_PCTS", "IDK", "N_PERTURBED", "PERTURBED_SPLITS", "QA_SPLITS", "ROW_KEYS", "SPLIT_NAMES", "UTILITY_SPLITS",
    "DataError", "Kind", "check_disjoint", "require_text", "retain_of", "split_kind", "validate_idk", "validate_rows",
    "validate_split_set", "validate_splits",
]

ROW_KEYS: tuple[str, ...] = ("id", "author_id", "question", "answer", "paraphrased_answer", "perturbed_answer")

N_PERTURBED = {"perturbed": 5, "utility": 3}
"""TOFU: 5 perturbed answers per author QA, 3 wrong options per real-author / world-fact question."""


def split_kind(name: str) -> Kind:
    """Which validation rules apply to split ``name`` (DataError for an unknown name)."""
    kind = SPLIT_KINDS.get(name)
    if kind is None:
        raise DataError(f"unknown split {name!r}; expected one of {', '.join(ALL_SPLIT_NAMES)} (or {IDK!r}); "
                        f"MUSE: {', '.join(MUSE_SPLIT_NAMES)}")
    return kind


class DataError(UserError):
    """A data problem, located: ``<file>, line L, row R, field 'F': <what is wrong / expected>``.

    ``row`` is the 0-based index of the record in its file (for JSON Lines the
    1-based ``line`` is given too, since that is what an editor shows). A
    :class:`~unlearn.errors.UserError`: the data is the user's to fix, so the CLI
    prints this message and exits with code 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if self.file:
            where.append(self.file)
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((", ".join(where) + ": " if where else "") + message)

    def __reduce__(self):  # keep it picklable (multiprocessing, pytest-xdist) despite keyword-only args
        return (_rebuild_error, (self.reason, self.file, self.row, self.field, self.line))


def _rebuild_error(message: str, file: str | None, row: int | None, field: str | None, line: int | None) -> DataError:
    return DataError(message, file=file, row=row, field=field, line=line)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_text(row: Mapping[str, Any], field: str, *, file: str, row_index: int) -> str:
    """``row[field]`` as a non-empty string, or a DataError saying what was there instead."""
    if field not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"missing required field (fields present: {present})", file=file, row=row_index, field=field)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"expected a non-empty string, got {_type_name(value)}", file=file, row=row_index, field=field)
    if not value.strip():
        raise DataError("expected a non-empty string, got an empty one", file=file, row=row_index, field=field)
    return value


def _optional_text(row: Mapping[str, Any], field: str, *, file: str, row_index: int) -> str | None:
    if row.get(field) is None:
        return None
    return require_text(row, field, file=file, row_index=row_index)


def _text_list(
    value: Any, *, expected: int | None, answer: str, file: str, row_index: int, field: str
) -> list[str]:
    """A list of non-empty strings (exactly ``expected`` of them when given), none equal to the true answer."""
    want = f"a list of {expected} strings" if expected is not None else "a non-empty list of strings"
    if not isinstance(value, list):
        raise DataError(f"expected {want}, got {_type_name(value)}", file=file, row=row_index, field=field)
    if expected is not None and len(value) != expected:
        raise DataError(f"expected {want}, got a list of {len(value)}", file=file, row=row_index, field=field)
    if not value:
        raise DataError(f"expected {want}, got an empty list", file=file, row=row_index, field=field)
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            got = "an empty string" if isinstance(item, str) else _type_name(item)
            raise DataError(f"expected {want}; item {j} is {got}", file=file, row=row_index, field=field)
        if item.strip() == answer.strip():
            # A "wrong" answer equal to the true one makes the truth ratio meaningless.
            raise DataError(f"item {j} equals the true answer {answer!r}", file=file, row=row_index, field=field)
    return list(value)


def validate_rows(rows: Any, *, file: str, kind: Kind, allow_empty: bool = False) -> list[dict]:
    """Check ``rows`` against the schema for ``kind`` and return normalised copies.

    * ``qa``: id, author_id, question, answer required; paraphrased_answer /
      perturbed_answer optional (real TOFU forget/retain files have neither).
    * ``perturbed``: paraphrased_answer required, perturbed_answer exactly 5 strings.
    * ``utility``: paraphrased_answer must be absent/None, perturbed_answer exactly 3.

    Normalised means: exactly the keys in :data:`ROW_KEYS` (missing optional keys
    become None, extra keys such as TOFU's ``paraphrased_question`` are dropped),
    lists copied. Text is not stripped: the benchmark's strings are kept verbatim.
    Ids must be unique within the list.

    MUSE's kinds (``text``, ``verbmem``, ``knowmem``) are checked by
    :func:`validate_muse_rows`. ``allow_empty``: an empty list is valid (MUSE's
    few-shot splits with ``icl_examples: 0``); otherwise it is an error.
    """
    if kind in MUSE_ROW_KEYS:
        return validate_muse_rows(rows, file=file, kind=kind, allow_empty=allow_empty)
    if kind not in ("qa", "perturbed", "utility"):
        raise ValueError(f"kind must be 'qa', 'perturbed' or 'utility', got {kind!r}")
    if not isinstance(rows, list):
        raise DataError(f"expected a list of rows (JSON objects), got {_type_name(rows)}", file=file)
    if not rows and not allow_empty:
        raise DataError("no rows: expected at least one question/answer record", file=file)
    seen: dict[str, int] = {}
    out: list[dict] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"expected a JSON object, got {_type_name(row)}", file=file, row=i)
        rec: dict[str, Any] = {key: require_text(row, key, file=file, row_index=i) for key in ROW_KEYS[:4]}
        para = row.get("paraphrased_answer")
        pert = row.get("perturbed_answer")
        if kind == "perturbed":
            rec["paraphrased_answer"] = require_text(row, "paraphrased_answer", file=file, row_index=i)
        elif kind == "utility":
            if para is not None:
                raise DataError(
                    "expected null: real_authors/world_facts rows have no paraphrase", file=file, row=i, field="paraphrased_answer"
                )
            rec["paraphrased_answer"] = None
        else:
            rec["paraphrased_answer"] = _optional_text(row, "paraphrased_answer", file=file, row_index=i)
        if kind in N_PERTURBED and "perturbed_answer" not in row:
            raise DataError(
                f"missing required field (expected a list of {N_PERTURBED[kind]} strings)", file=file, row=i, field="perturbed_answer"
            )
        if kind == "qa" and pert is None:
            rec["perturbed_answer"] = None
        else:
            rec["perturbed_answer"] = _text_list(
                pert, expected=N_PERTURBED.get(kind), answer=rec["answer"], file=file, row_index=i, field="perturbed_answer"
            )
        if rec["id"] in seen:
            raise DataError(f"duplicate id {rec['id']!r} (also row {seen[rec['id']]})", file=file, row=i, field="id")
        seen[rec["id"]] = i
        out.append(rec)
    return out


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_disjoint(forget: list[dict], retain: list[dict], *, forget_name: str, retain_name: str) -> None:
    """Raise DataError if ``forget`` and ``retain`` share a row id or an author.

    Sharing an *author* is enough to invalidate an unlearning experiment: facts
    about a forget author left in the retain set leak the answer back.
    """
    retain_ids = {r["id"] for r in retain}
    retain_authors = {r["author_id"] for r in retain}
    shared_ids = [r["id"] for r in forget if r["id"] in retain_ids]
    shared_authors = list(dict.fromkeys(r["author_id"] for r in forget if r["author_id"] in retain_authors))
    if not shared_ids and not shared_authors:
        return
    if shared_authors:
        first_row = next(i for i, r in enumerate(forget) if r["author_id"] in retain_authors)
        field = "author_id"
    else:
        first_row = next(i for i, r in enumerate(forget) if r["id"] in retain_ids)
        field = "id"
    parts = []
    if shared_authors:
        parts.append(f"{len(shared_authors)} author(s) ({_first(shared_authors)})")
    if shared_ids:
        parts.append(f"{len(shared_ids)} row id(s) ({_first(shared_ids)})")
    raise DataError(
        f"forget split overlaps {retain_name}: shares {' and '.join(parts)}; forget and retain must be disjoint by author and by row",
        file=forget_name,
        row=first_row,
        field=field,
    )


def _check_outside_full(holdout: list[dict], full: list[dict], *, name: str, full_name: str) -> None:
    """A holdout split shares no author, row id or question with ``full``: its authors are the non-members."""
    taken = {key: {r[key] for r in full} for key in ("author_id", "id", "question")}
    for key, what in (("author_id", "author"), ("id", "row id"), ("question", "question")):
        shared = [(i, r[key]) for i, r in enumerate(holdout) if r[key] in taken[key]]
        if shared:
            raise DataError(
                f"shares {len(shared)} {what}(s) with {full_name} ({_first(list(dict.fromkeys(v for _, v in shared)))}); "
                "holdout authors must be outside full (no model may train on them)",
                file=name, row=shared[0][0], field=key,
            )


def _check_within(smaller: list[dict], larger: list[dict], *, name: str, larger_name: str) -> None:
    """Every row of ``smaller`` (e.g. holdout05) is a row of ``larger`` (holdout10), with the same text and author."""
    rows = {r["id"]: r for r in larger}
    for i, r in enumerate(smaller):
        ref = rows.get(r["id"])
        if ref is None:
            raise DataError(f"id {r['id']!r} is not a row of {larger_name}; the smaller holdout splits are part of the larger",
                            file=name, row=i, field="id")
        for key in ("author_id", "question", "answer"):
            if r[key] != ref[key]:
                raise DataError(f"differs from the same row ({r['id']}) in {larger_name}: {r[key]!r} vs {ref[key]!r}",
                                file=name, row=i, field=key)


def validate_idk(lines: Any, *, file: str) -> list[str]:
    """The IdK refusal strings: a non-empty list of non-empty strings."""
    if not isinstance(lines, list) or not lines:
        raise DataError(f"expected a non-empty list of refusal strings, got {_type_name(lines) if not isinstance(lines, list) else 'an empty list'}", file=file)
    for i, s in enumerate(lines):
        if not isinstance(s, str) or not s.strip():
            raise DataError(f"expected a non-empty string, got {_type_name(s) if not isinstance(s, str) else 'an empty one'}", file=file, row=i)
    return list(lines)


def validate_splits(splits: Mapping[str, Any], *, origin: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validate a complete dataset (every split in :data:`SPLIT_NAMES` plus ``idk``) and its cross-split invariants.

    ``origin`` maps a split name to the file it came from, so messages point at
    the file to fix. The rules are those of :func:`validate_split_set`; a
    complete dataset is where all of them apply.
    """
    return validate_split_set(splits, allowed=(*SPLIT_NAMES, IDK), required=(*SPLIT_NAMES, IDK), origin=origin)


def validate_split_set(
    splits: Mapping[str, Any],
    *,
    allowed: Iterable[str] = (*ALL_SPLIT_NAMES, IDK),
    required: Iterable[str] = (),
    origin: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate any set of splits (a whole dataset, a request split set, the few a stage reads): one rule book.

    Each split is checked against the schema of its kind (``idk`` as refusal
    strings); then every cross-split rule whose splits are all in the set:

    * with ``full``: every author split is a subset of ``full`` and each row
      matches its ``full`` row (same question, answer, author); utility ids do
      not collide with author-row ids; a holdout split (holdout01/05/10) is the
      opposite, disjoint from ``full`` by author, row id and question;
    * holdout01 within holdout05 within holdout10 (same rows, as in TOFU's files);
    * for each forget split F (forgetXX, forget_requests): F and its retain
      split (:func:`~unlearn.data.names.retain_of`) are disjoint by author and
      row, and for forgetXX together exactly ``full``; F's perturbed split holds
      F's rows; ``retain_perturbed`` shares no author or row with F.

    A rule that needs a split not in the set is skipped, so reading two splits
    checks what two splits can show and writing a dataset checks everything.
    Names outside ``allowed`` or a missing ``required`` name raise DataError.
    Returns the normalised splits (see :func:`validate_rows`) in the order of
    :data:`~unlearn.data.names.ALL_SPLIT_NAMES`, ``idk`` last.
    """
    origin = dict(origin or {})
    allowed = tuple(allowed)

    def where(name: str) -> str:
        return origin.get(name, name)

    unknown = [k for k in splits if k not in allowed]
    if unknown:
        raise DataError(f"unknown split(s) {', '.join(map(repr, unknown))}; expected {', '.join(allowed)}")
    missing = [k for k in required if k not in splits]
    if missing:
        raise DataError(f"missing split(s): {', '.join(missing)}")
    out: dict[str, Any] = {
        name: validate_rows(splits[name], file=where(name), kind=split_kind(name)) for name in ALL_SPLIT_NAMES if name in splits
    }
    if IDK in splits:
        out[IDK] = validate_idk(splits[IDK], file=where(IDK))

    full = {r["id"]: r for r in out[FULL]} if FULL in out else None
    if full is not None:
        for name in (n for n in ALL_SPLIT_NAMES if n in out and n != FULL and SPLIT_KINDS[n] != "utility"
                     and n not in HOLDOUT_SPLITS):
            for i, r in enumerate(out[name]):
                ref = full.get(r["id"])
                if ref is None:
                    raise DataError(f"id {r['id']!r} is not a row of full; every split must be a subset of full", file=where(name), row=i, field="id")
                for key in ("author_id", "question", "answer"):
                    if r[key] != ref[key]:
                        raise DataError(
                            f"differs from the same row ({r['id']}) in full: {r[key]!r} vs {ref[key]!r}", file=where(name), row=i, field=key
                        )
        for name in (n for n in UTILITY_SPLITS if n in out):
            for i, r in enumerate(out[name]):
                if r["id"] in full:
                    raise DataError(f"id {r['id']!r} is also an author row id; ids must be unique across the dataset", file=where(name), row=i, field="id")

    holdouts = [n for n in HOLDOUT_SPLITS if n in out]
    for name in holdouts if full is not None else ():
        _check_outside_full(out[name], out[FULL], name=where(name), full_name=where(FULL))
    for smaller, larger in zip(holdouts, holdouts[1:]):
        _check_within(out[smaller], out[larger], name=where(smaller), larger_name=where(larger))

    for forget in (f for f in FORGET_SPLITS if f in out):
        retain, perturbed = retain_of(forget), perturbed_of(forget)
        if retain in out:
            check_disjoint(out[forget], out[retain], forget_name=where(forget), retain_name=where(retain))
            union = {r["id"] for r in out[forget]} | {r["id"] for r in out[retain]}
            if full is not None and forget in TOFU_FORGET_SPLITS and union != set(full):
                lost = [i for i in full if i not in union]
                raise DataError(
                    f"{forget} and {retain} together must be exactly full; {len(lost)} row(s) of full are in neither ({_first(lost)})",
                    file=where(retain),
                )
        if perturbed in out:
            want = {r["id"] for r in out[forget]}
            got = {r["id"] for r in out[perturbed]}
            if want != got:
                extra = [r["id"] for r in out[perturbed] if r["id"] not in want]
                lack = [r["id"] for r in out[forget] if r["id"] not in got]
                raise DataError(
                    f"must hold the same rows as {forget}: {len(lack)} missing ({_first(lack)}), {len(extra)} extra ({_first(extra)})",
                    file=where(perturbed),
                )
        if RETAIN_PERTURBED in out:
            check_disjoint(out[forget], out[RETAIN_PERTURBED], forget_name=where(forget), retain_name=where(RETAIN_PERTURBED))
    return out


# --- MUSE (Shi et al. 2024): raw articles, continuation prompts, plain QA ---------------------------

MUSE_ROW_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("id", "text"),
    "verbmem": ("id", "prompt", "gt"),
    "knowmem": ("id", "question", "answer"),
}
"""The fields of a MUSE row, per kind: every one a required non-empty string, and the only keys a normalised row has."""

_MUSE_WHAT = {"text": "article", "verbmem": "continuation prompt (prompt, gt)", "knowmem": "question/answer"}

MUSE_MAY_BE_EMPTY: tuple[str, ...] = (KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN_ICL)
"""MUSE splits that may hold no rows: the few-shot examples (``muse.synthetic.icl_examples: 0`` means zero-shot)."""


def validate_muse_rows(rows: Any, *, file: str, kind: str, allow_empty: bool = False) -> list[dict]:
    """Check MUSE rows of ``kind`` (``text``: {id, text}; ``verbmem``: {id, prompt, gt}; ``knowmem``: {id, question, answer}).

    Returns normalised copies (exactly the keys of :data:`MUSE_ROW_KEYS`, extra keys
    dropped, text verbatim: articles keep their whitespace). Ids must be unique.
    """
    if kind not in MUSE_ROW_KEYS:
        raise ValueError(f"kind must be one of {', '.join(MUSE_ROW_KEYS)}, got {kind!r}")
    keys = MUSE_ROW_KEYS[kind]
    if not isinstance(rows, list):
        raise DataError(f"expected a list of rows (JSON objects {{{', '.join(keys)}}}), got {_type_name(rows)}", file=file)
    if not rows and not allow_empty:
        raise DataError(f"no rows: expected at least one {_MUSE_WHAT[kind]} record", file=file)
    seen: dict[str, int] = {}
    out: list[dict] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"expected a JSON object {{{', '.join(keys)}}}, got {_type_name(row)}", file=file, row=i)
        rec = {key: require_text(row, key, file=file, row_index=i) for key in keys}
        if rec["id"] in seen:
            raise DataError(f"duplicate id {rec['id']!r} (also row {seen[rec['id']]})", file=file, row=i, field="id")
        seen[rec["id"]] = i
        out.append(rec)
    return out


def passage_test(texts: Iterable[str]) -> Callable[[str], bool]:
    """A test of "is this one of ``texts``, or a passage of them": how privleak_forget relates to fold1.

    The synthetic privleak_forget holds fold1's articles themselves; MUSE-News's
    ``privleak/forget.json`` holds 2048-token chunks of ``raw/forget.txt`` (fold1's
    articles joined by blank lines), which may run over an article's end. A text
    passes if it is an article, or if each of its blank-line-separated pieces occurs
    in the joined articles (whole paragraphs by set look-up, the cut ends by search),
    which still holds after the loader drops empty and repeated articles.
    """
    articles = list(texts)
    whole = set(articles)
    joined = "\n\n".join(articles)
    paragraphs = set(joined.split("\n\n"))

    def test(text: str) -> bool:
        if text in whole:
            return True
        pieces = [p for p in text.split("\n\n") if p.strip()]
        return bool(pieces) and all(p in paragraphs or p in joined for p in pieces)

    return test


def validate_muse_splits(splits: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> dict[str, list[dict]]:
    """Validate a complete MUSE dataset: every split of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES` and the rules between them.

    The rules are those of :func:`validate_muse_split_set`, all of which apply to a complete dataset.
    """
    return validate_muse_split_set(splits, required=MUSE_SPLIT_NAMES, origin=origin)


def validate_muse_split_set(
    splits: Mapping[str, Any], *, required: Iterable[str] = (), origin: Mapping[str, str] | None = None
) -> dict[str, list[dict]]:
    """Validate any set of MUSE splits: each against its kind's schema, then every cross-split rule its splits allow.

    * the folds are pairwise disjoint by text: an article in two folds would be
      forgotten with one and kept with the other;
    * ``privleak_retain`` (always trained on: the MIA members) shares no text with a fold;
    * ``privleak_holdout`` (never trained on: the non-members) shares no text with a
      fold or with ``privleak_retain``;
    * every ``privleak_forget`` text is a fold1 article or a passage of fold1's text
      (:func:`passage_test`).

    A rule needing a split not in the set is skipped. Names outside MUSE's or a
    missing ``required`` name raise DataError. Returns the normalised splits in
    the order of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES`.
    """
    origin = dict(origin or {})

    def where(name: str) -> str:
        return origin.get(name, name)

    unknown = [k for k in splits if k not in MUSE_SPLIT_NAMES]
    if unknown:
        raise DataError(f"unknown MUSE split(s) {', '.join(map(repr, unknown))}; expected {', '.join(MUSE_SPLIT_NAMES)}")
    missing = [k for k in required if k not in splits]
    if missing:
        raise DataError(f"missing MUSE split(s): {', '.join(missing)}")
    out = {
        name: validate_rows(splits[name], file=where(name), kind=split_kind(name), allow_empty=name in MUSE_MAY_BE_EMPTY)
        for name in MUSE_SPLIT_NAMES if name in splits
    }

    owner: dict[str, tuple[str, int, str]] = {}  # article text -> (split, row, id) of its first occurrence
    for fold in (f for f in MUSE_FOLDS if f in out):
        mine: dict[str, tuple[str, int, str]] = {}
        for i, r in enumerate(out[fold]):
            prev = owner.get(r["text"])
            if prev is not None:
                raise DataError(
                    f"same text as {where(prev[0])} row {prev[1]} (id {prev[2]!r}); the folds must be pairwise disjoint "
                    "(an article in two folds is forgotten with one and kept with the other)",
                    file=where(fold), row=i, field="text",
                )
            mine.setdefault(r["text"], (fold, i, r["id"]))
        owner.update(mine)
    why = {
        PRIVLEAK_RETAIN: "privleak_retain is always trained on (the membership-inference members), so it cannot be part of a fold",
        PRIVLEAK_HOLDOUT: "privleak_holdout must be articles no model trains on (the membership-inference non-members)",
    }
    for name in (PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT):
        if name not in out:
            continue
        for i, r in enumerate(out[name]):
            prev = owner.get(r["text"])
            if prev is not None:
                raise DataError(f"same text as {where(prev[0])} row {prev[1]} (id {prev[2]!r}); {why[name]}",
                                file=where(name), row=i, field="text")
        for i, r in enumerate(out[name]):
            owner.setdefault(r["text"], (name, i, r["id"]))
    if PRIVLEAK_FORGET in out and MUSE_FOLDS[0] in out:
        is_fold1 = passage_test(r["text"] for r in out[MUSE_FOLDS[0]])
        for i, r in enumerate(out[PRIVLEAK_FORGET]):
            if not is_fold1(r["text"]):
                raise DataError(
                    f"neither an article of {where(MUSE_FOLDS[0])} nor a passage of its text; privleak_forget holds "
                    "forget-set text (the membership-inference members that unlearning should turn into non-members)",
                    file=where(PRIVLEAK_FORGET), row=i, field="text",
                )
    return out
