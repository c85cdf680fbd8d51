"""The data validation gate for MUSE: a Great Expectations suite run on the MUSE split files before any training.

The same gate of record as :mod:`unlearn.data.validate` (TOFU), for MUSE's splits:
the ``validate`` stage runs :func:`run_muse_validation` on the files in
``data.out_dir`` and fails (nothing downstream runs) when any expectation fails.
Why a second suite and not a branch of the TOFU one: MUSE's rows are articles,
continuation prompts and plain QA, with no authors and different cross-split
rules, so hardly an expectation is shared; what is shared (the report, the
failure format, the ephemeral GX context, the split-file reader) is imported.

Every split of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES` is checked, one GX
suite each (column / helper column in brackets):

* rows present (``knowmem_*_icl`` may be empty: zero-shot) and row count = manifest.json's ``rows``;
* required columns exist and are not null: id and the kind's fields (text | prompt, gt | question, answer);
* ``id`` unique within the split;
* every field a non-empty string (``<field>_len_stripped`` >= 1) within length
  bounds (``<field>_len``: articles, prompts, continuations up to 100,000
  characters, questions and answers up to 2,000);
* the folds are pairwise disjoint by text (``text_sha1`` of a fold not among the
  earlier folds'), ``privleak_retain`` shares no text with a fold and
  ``privleak_holdout`` none with a fold or ``privleak_retain``;
* every ``privleak_forget`` text is a fold1 article or a passage of fold1's text (``in_fold1``).

Failures name the split, the expectation, the column and the failing row ids
(first 20) with their count (:class:`~unlearn.data.validate.ValidationReport`).

With the model's tokenizer the result also has a ``truncation`` section
(:func:`muse_truncation_section`): per text split the articles longer than
``model.max_length`` tokens (training chunks them, so nothing is lost; membership
inference scores only their first ``max_length`` tokens), VerbMem prompts whose
length plus ``muse.eval.verbmem_max_new_tokens`` exceeds ``max_length``, and
KnowMem prompts (few-shot examples + question) whose length plus
``muse.eval.knowmem_max_new_tokens`` does. A warning, not a failure, like TOFU's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .names import (
    KNOWMEM_FORGET,
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN,
    KNOWMEM_RETAIN_ICL,
    MUSE_FOLDS,
    MUSE_SPLIT_NAMES,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    PRIVLEAK_RETAIN,
    VERBMEM_FORGET,
)
from .schema import MUSE_MAY_BE_EMPTY, MUSE_ROW_KEYS, passage_test, split_kind
from .splits import MANIFEST, read_manifest
from .validate import MAX_ANSWER_CHARS, ROW, ValidationReport, _failure, _gx_context, _load_split_file, _text_len, result_path

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..config import Params

log = logging.getLogger("unlearn")

MAX_TEXT_CHARS = 100_000
"""Longest article / prompt / continuation (MUSE-News: articles up to ~41,000 characters, prompts ~4,400)."""
MAX_QA_CHARS = MAX_ANSWER_CHARS
"""Longest KnowMem question or answer (MUSE-News: questions up to 188, answers up to 136 characters)."""
FIELD_KIND = {"text": "text", "prompt": "text", "gt": "text", "question": "qa", "answer": "qa"}

KNOWMEM_SPLITS = {KNOWMEM_FORGET: KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN: KNOWMEM_RETAIN_ICL}
"""Each KnowMem question split and the few-shot examples prepended to its questions."""


def knowmem_prompt(icl: list[dict], question: str) -> str:
    """The KnowMem prompt whose length is counted: every few-shot pair, then the question (MUSE's QA template).

    ``Question: q\\nAnswer: a`` pairs separated by a blank line, as the tokenizer's
    corpus writes QA (:meth:`unlearn.benchmark.muse.MUSE.corpus_texts`).
    """
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer:"


# --------------------------------------------------------------------------- report
class MuseValidationReport(ValidationReport):
    """:class:`~unlearn.data.validate.ValidationReport` with MUSE's ``truncation`` section in :meth:`render`."""

    def _render_truncation(self) -> list[str]:
        t = self.truncation
        if t is None:
            return []
        if not t.get("computed", True):
            return [f"  truncation: not counted ({t.get('reason')})"]
        lines = [f"  token lengths at model.max_length={t['max_length']} (tokenizer {t.get('tokenizer')}): "
                 f"{t['over']} of {t['rows']} rows longer"]
        for name, c in t["splits"].items():
            if c["over"]:
                lines.append(f"    {name}: {c['over']}/{c['rows']} ({c['percent']:.2f} %) longer than {t['max_length']} "
                             f"tokens ({c['measure']}; longest {c['max_tokens']}): {c['effect']}")
        if t.get("warning"):
            lines.append(f"    WARNING: {t['warning']}")
        return lines


# --------------------------------------------------------------------------- frames
def _sha1(v: Any) -> Any:
    return hashlib.sha1(v.encode("utf-8")).hexdigest() if isinstance(v, str) else None


def muse_frame(rows: list, kind: str, *, fold1_test=None) -> pd.DataFrame:
    """``rows`` as a DataFrame with the suite's helper columns: ``<field>_len``, ``<field>_len_stripped``
    per field of the kind, ``text_sha1`` for articles and, given ``fold1_test``, ``in_fold1``."""
    import pandas as pd

    df = pd.DataFrame.from_records([r if isinstance(r, dict) else {} for r in rows])
    df.insert(0, ROW, range(len(df)))
    for f in MUSE_ROW_KEYS[kind][1:]:
        if f in df.columns:
            values = df[f].tolist()
            df[f"{f}_len_stripped"] = pd.array([_text_len(v, True) for v in values], dtype="Int64")
            df[f"{f}_len"] = pd.array([_text_len(v, False) for v in values], dtype="Int64")
    if kind == "text" and "text" in df.columns:
        df["text_sha1"] = [_sha1(v) for v in df["text"].tolist()]
        if fold1_test is not None:
            df["in_fold1"] = [isinstance(v, str) and bool(fold1_test(v)) for v in df["text"].tolist()]
    return df


# --------------------------------------------------------------------------- suite
def _expectations(name: str, df: pd.DataFrame, *, earlier: dict[str, set[str]], manifest: dict | None,
                  max_text_chars: int, max_qa_chars: int) -> list:
    """The GX expectations of split ``name``; ``earlier``: text hashes of the splits its texts must not be among."""
    import great_expectations.expectations as gxe

    kind = split_kind(name)
    cols = set(df.columns)
    exps: list = []
    if name not in MUSE_MAY_BE_EMPTY:
        exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"rule": "the split must have rows"}))
    entry = manifest.get(name) if manifest is not None else None
    if isinstance(entry, dict) and isinstance(entry.get("rows"), int):
        exps.append(gxe.ExpectTableRowCountToEqual(value=entry["rows"], meta={"rule": f"row count must equal rows in {MANIFEST}"}))
    if df.empty and name in MUSE_MAY_BE_EMPTY:
        return exps  # no rows, no columns: nothing more to check
    for col in MUSE_ROW_KEYS[kind]:
        exps.append(gxe.ExpectColumnToExist(column=col))
        if col in cols:
            exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    if "id" in cols:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
    for f in MUSE_ROW_KEYS[kind][1:]:
        top = max_text_chars if FIELD_KIND[f] == "text" else max_qa_chars
        if f"{f}_len_stripped" in cols:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=f"{f}_len_stripped", min_value=1,
                                                          meta={"rule": f"{f} must not be empty or whitespace only"}))
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=f"{f}_len", min_value=1, max_value=top,
                                                          meta={"rule": f"{f} must be 1 to {top:,} characters long"}))
    if "text_sha1" in cols and earlier:
        for other, hashes in earlier.items():
            if hashes:
                exps.append(gxe.ExpectColumnValuesToNotBeInSet(column="text_sha1", value_set=sorted(hashes),
                                                               meta={"rule": _DISJOINT[name].format(other=other)}))
    if "in_fold1" in cols:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="in_fold1", value_set=[True], meta={
            "rule": "privleak_forget texts must be fold1 articles or passages of fold1's text (forget-set text)"}))
    return exps


_DISJOINT = {
    **{f: "text must not be an article of {other}: the folds are pairwise disjoint (an article in two folds is "
          "forgotten with one and kept with the other)" for f in MUSE_FOLDS},
    PRIVLEAK_RETAIN: "text must not be an article of {other}: privleak_retain is always trained on (the "
                     "membership-inference members)",
    PRIVLEAK_HOLDOUT: "text must not be an article of {other}: privleak_holdout is never trained on (the "
                      "membership-inference non-members)",
}


def _disjoint_from(name: str, hashes: dict[str, set[str]]) -> dict[str, set[str]]:
    """The splits whose texts split ``name``'s must not share (the earlier folds; the folds, and privleak_retain)."""
    if name in MUSE_FOLDS:
        others = list(MUSE_FOLDS[:MUSE_FOLDS.index(name)])
    elif name == PRIVLEAK_RETAIN:
        others = list(MUSE_FOLDS)
    elif name == PRIVLEAK_HOLDOUT:
        others = [*MUSE_FOLDS, PRIVLEAK_RETAIN]
    else:
        others = []
    return {o: hashes[o] for o in others if o in hashes}


def _muse_failure(split: str, res: Any, forget_split: str) -> dict:
    """:func:`unlearn.data.validate._failure`, its message replaced by the expectation's rule where it has one."""
    f = _failure(split, res, forget_split)
    cfg = res.to_json_dict().get("expectation_config") or {}
    rule = (cfg.get("meta") or {}).get("rule")
    if rule and not str(f["message"] or "").startswith("expectation raised"):
        f["message"] = rule
    if cfg.get("type") in ("expect_column_values_to_not_be_in_set", "expect_column_values_to_be_in_set"):
        f["expected"] = None  # the value set (hashes) says nothing to a reader; the rule does
    return f


def validate_muse_splits_gx(
    splits: dict[str, Any], *, forget_split: str | None, manifest: dict | None,
    max_text_chars: int = MAX_TEXT_CHARS, max_qa_chars: int = MAX_QA_CHARS,
) -> MuseValidationReport:
    """Run the GX suite on MUSE's ``splits`` (row dicts as read from the files, unvalidated); never raises on bad data.

    Splits of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES` that are missing are
    failures; ``manifest`` gives the declared row counts (None skips them).
    ``forget_split`` only labels the report (every split is checked whatever is forgotten).
    """
    t0 = time.perf_counter()
    names = list(MUSE_SPLIT_NAMES)
    failures: list[dict] = []
    checked: dict[str, dict] = {}
    frames: dict[str, pd.DataFrame] = {}
    fold1 = splits.get(MUSE_FOLDS[0])
    fold1_test = (passage_test(r["text"] for r in fold1 if isinstance(r, dict) and isinstance(r.get("text"), str))
                  if isinstance(fold1, list) else None)
    for name in names:
        rows = splits.get(name)
        if not isinstance(rows, list):
            failures.append({
                "split": name, "expectation": "split_exists", "column": None, "rows": [], "count": None,
                "observed": None if rows is None else type(rows).__name__, "expected": None,
                "message": "split is missing (expected a list of rows)" if rows is None else "expected a list of rows",
            })
            continue
        frames[name] = muse_frame(rows, split_kind(name), fold1_test=fold1_test if name == PRIVLEAK_FORGET else None)
    hashes = {n: {h for h in df["text_sha1"].tolist() if h} for n, df in frames.items() if "text_sha1" in df.columns}

    if frames:
        ctx = _gx_context()
        import great_expectations as gx

        source = ctx.data_sources.add_pandas("muse_splits")
        for name, df in frames.items():
            exps = _expectations(name, df, earlier=_disjoint_from(name, hashes), manifest=manifest,
                                 max_text_chars=max_text_chars, max_qa_chars=max_qa_chars)
            suite = gx.ExpectationSuite(name=f"gate_{name}")
            for e in exps:
                suite.add_expectation(e)
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all").get_batch(
                batch_parameters={"dataframe": df}
            )
            index_cols = [ROW, "id"] if "id" in df.columns else [ROW]
            res = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_cols})
            checked[name] = {"rows": int(len(df)), "expectations": len(suite.expectations)}
            for r in res.results:
                if not r.success:
                    failures.append(_muse_failure(name, r, forget_split or ""))
    order = {n: i for i, n in enumerate(names)}
    failures.sort(key=lambda f: order.get(f["split"], len(order)))
    return MuseValidationReport(
        success=not failures, failures=failures, checked={n: checked[n] for n in names if n in checked},
        forget_split=forget_split, elapsed_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- token lengths
_EFFECT = {
    **{f: "training text: chunked into max_length windows, nothing is lost" for f in MUSE_FOLDS},
    PRIVLEAK_RETAIN: "trained on in max_length chunks; membership inference scores only the first max_length tokens",
    PRIVLEAK_FORGET: "membership inference scores only the first max_length tokens",
    PRIVLEAK_HOLDOUT: "membership inference scores only the first max_length tokens",
    VERBMEM_FORGET: "the prompt and the continuation do not fit in the model's context together",
    KNOWMEM_FORGET: "the few-shot prompt and the answer do not fit in the model's context together",
    KNOWMEM_RETAIN: "the few-shot prompt and the answer do not fit in the model's context together",
}
SCORED = (PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT, VERBMEM_FORGET, KNOWMEM_FORGET, KNOWMEM_RETAIN)
"""Splits whose over-long rows change what a metric measures (the folds are chunked: nothing is lost)."""


def muse_truncation_section(splits: dict[str, Any], tokenizer: Any, max_length: int, *, verbmem_new_tokens: int,
                            knowmem_new_tokens: int, source: str | None) -> dict:
    """The result's ``truncation`` section: per split, the rows longer than ``max_length`` tokens (BOS counted).

    * text splits: the article;
    * ``verbmem_forget``: the prompt plus ``verbmem_new_tokens`` generated tokens;
    * ``knowmem_*_qa``: :func:`knowmem_prompt` (its few-shot split's pairs + the question) plus ``knowmem_new_tokens``.

    Per split ``{"rows", "over", "percent", "max_tokens", "measure", "effect"}`` (text splits also
    ``"chunks"``: the max_length training windows their articles make); ``suggested_max_length``
    is the smallest max_length under which fewer than 1 % of every scored split's rows are longer.
    Logs a warning when a scored split has longer rows. ``tokenizer`` None: ``{"computed": False, "reason"}``.
    """
    from ..models.truncation import min_length_for

    if tokenizer is None:
        reason = source or "no tokenizer given"
        log.warning("data validation: token lengths not counted: %s", reason)
        return {"computed": False, "reason": reason, "max_length": int(max_length)}
    bos = 0 if getattr(tokenizer, "bos_token_id", None) is None else 1

    def lengths(texts: list[str]) -> list[int]:
        return [bos + len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    table: dict[str, dict[str, Any]] = {}
    suggested = 0
    for name in MUSE_SPLIT_NAMES:
        rows = splits.get(name)
        if not isinstance(rows, list) or name in MUSE_MAY_BE_EMPTY:
            continue
        good = [r for r in rows if isinstance(r, dict)]
        kind = split_kind(name)
        extra = {}
        if kind == "text":
            ns = lengths([r["text"] for r in good if isinstance(r.get("text"), str)])
            measure = "article"
            room = max(max_length - bos, 1)
            extra["chunks"] = sum(math.ceil((n - bos) / room) for n in ns)
        elif kind == "verbmem":
            ns = [n + verbmem_new_tokens for n in lengths([r["prompt"] for r in good if isinstance(r.get("prompt"), str)])]
            measure = f"prompt + {verbmem_new_tokens} new tokens"
        else:
            icl_rows = splits.get(KNOWMEM_SPLITS.get(name, ""))
            icl = [r for r in icl_rows if isinstance(r, dict)] if isinstance(icl_rows, list) else []
            qs = [knowmem_prompt(icl, r["question"]) for r in good if isinstance(r.get("question"), str)]
            ns = [n + knowmem_new_tokens for n in lengths(qs)]
            measure = f"{len(icl)} few-shot pairs + question + {knowmem_new_tokens} new tokens"
        if not ns:
            continue
        over = sum(1 for n in ns if n > max_length)
        table[name] = {"rows": len(ns), "over": over, "percent": round(100.0 * over / len(ns), 2), "max_tokens": max(ns),
                       "measure": measure, "effect": _EFFECT[name], **extra}
        if name in SCORED:
            suggested = max(suggested, min_length_for(ns))
    section: dict[str, Any] = {
        "computed": True, "tokenizer": source, "max_length": int(max_length), "splits": table,
        "rows": sum(c["rows"] for c in table.values()), "over": sum(c["over"] for c in table.values()),
        "suggested_max_length": suggested, "warning": None,
    }
    scored = [f"{n} {c['over']}/{c['rows']}" for n, c in table.items() if n in SCORED and c["over"]]
    if scored:
        section["warning"] = (
            f"rows longer than model.max_length={max_length} tokens in the evaluation splits ({'; '.join(scored)}) are "
            f"scored on what fits; model.max_length={suggested} would leave under 1 % of every evaluation split's rows longer "
            "(a from-scratch model also needs model.arch.max_position_embeddings >= it)")
        log.warning("data validation: %s", section["warning"])
    return section


# --------------------------------------------------------------------------- files
def run_muse_validation(p: Params, *, tokenizer: Any = None, tokenizer_source: str | None = None,
                        **bounds: int) -> MuseValidationReport:
    """Validate the MUSE split files in ``p.data.out_dir``; write ``<reports_dir>/validation/result.json`` (always).

    ``tokenizer``: the model's tokenizer, for the ``truncation`` section (``tokenizer_source``
    names where it came from or, without one, why there is none). ``bounds``:
    ``max_text_chars`` / ``max_qa_chars`` overrides. Raises FileNotFoundError when there is
    no manifest (the data stage has not run); a failed suite is the caller's to raise on
    (:class:`~unlearn.data.validate.ValidationFailed`).
    """
    from ..io import write_json

    out_dir = Path(p.data.out_dir)
    manifest = read_manifest(out_dir)
    splits: dict[str, Any] = {}
    file_failures: list[dict] = []
    for name in MUSE_SPLIT_NAMES:
        rows, failure = _load_split_file(out_dir, name, manifest)
        if failure is not None:
            file_failures.append(failure)
        else:
            splits[name] = rows
    report = validate_muse_splits_gx(splits, forget_split=p.data.forget_split, manifest=manifest, **bounds)
    if file_failures:  # reported once, in place of the generic "split is missing"
        bad = {f["split"] for f in file_failures}
        rest = [f for f in report.failures if not (f["split"] in bad and f["expectation"] == "split_exists")]
        order = {n: i for i, n in enumerate(MUSE_SPLIT_NAMES)}
        report.failures = sorted(file_failures + rest, key=lambda f: order.get(f["split"], len(order)))
        report.success = False
    report.truncation = muse_truncation_section(
        splits, tokenizer, p.model.max_length, verbmem_new_tokens=p.muse.eval.verbmem_max_new_tokens,
        knowmem_new_tokens=p.muse.eval.knowmem_max_new_tokens, source=tokenizer_source,
    )
    write_json(result_path(p), report.to_dict())
    log.info("data validation %s in %.1fs: %s", "passed" if report.success else "FAILED", report.elapsed_s, result_path(p))
    return report
