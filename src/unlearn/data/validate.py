"""The data validation gate: a Great Expectations suite run on the split files before any training.

:mod:`unlearn.data.schema` already checks rows as they are written and read; this
module is the independent second line, the *gate of record* of the pipeline: the
``validate`` stage runs it on the files in ``data.out_dir`` and fails (nothing
downstream runs) when any expectation fails. It looks at the splits the
experiment uses, for ``data.forget_split`` = forgetXX:

    forgetXX, retainXX, forgetXX_perturbed, retain_perturbed, real_authors, world_facts, full, holdoutXX

each as a pandas DataFrame with a few helper columns, one GX expectation suite
per split, in an ephemeral context (no files, no cloud, no network, no data docs).

Expectations (``column`` / helper column in brackets):

* required columns exist and are not null: id, author_id, question, answer
  (+ paraphrased_answer, perturbed_answer in ``*_perturbed``; + perturbed_answer in
  real_authors / world_facts);
* ``id`` unique within the split;
* retainXX and retain_perturbed share no ``author_id`` and no ``id`` with forgetXX;
* holdoutXX (the non-members of the privacy-leakage test) shares no ``author_id``,
  ``id`` or ``question`` with full;
* row count = manifest.json's ``rows``, distinct authors = its ``authors``;
* forgetXX / forgetXX_perturbed cover ``n_forget_authors(n, XX)`` of the ``n``
  authors of ``full``, retainXX the other ``n - k``; holdoutXX has as many
  (``n_forget_authors(n, XX)``) authors of its own;
* ``n_perturbed`` = 5 per row in ``*_perturbed``, 3 in real_authors / world_facts;
* ``answer_len`` within [min_answer_chars, max_answer_chars] (1 .. 2000);
* ``question_len_stripped`` and ``answer_len_stripped`` >= 1 (no empty / whitespace-only text).

Failures name the split, the expectation, the column and the failing row ids
(first 20) with their count; :meth:`ValidationReport.render` turns them into a
readable report. GX is imported inside the functions (its import takes seconds).

Besides the expectations, the result carries a ``truncation`` section: per split
and field (answer, paraphrased_answer, perturbed_answer), how many rows the
model's tokenizer cuts at ``model.max_length`` (:mod:`unlearn.models.truncation`).
Cut rows are a warning (logged, naming the splits and a ``max_length`` that cuts
under 1 %), not a failure: they are valid, only shorter, examples -- but a silent
cut changes what every metric measures, so it is always reported.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .names import FULL, REAL_AUTHORS, RETAIN_PERTURBED, WORLD_FACTS, holdout_of, perturbed_of, retain_of
from .schema import N_PERTURBED, DataError, split_kind
from .splits import MANIFEST, SplitFileError, load_split_file, n_forget_authors, read_manifest

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..config import Params

log = logging.getLogger("unlearn")

MIN_ANSWER_CHARS = 1
MAX_ANSWER_CHARS = 2000
MAX_ROWS_SHOWN = 20
REQUIRED = ("id", "author_id", "question", "answer")
ROW = "_row"  # helper column: 0-based position of the row in its file (names rows whose id is null)
RESULT_FILE = Path("validation") / "result.json"


def gate_splits(forget_split: str) -> list[str]:
    """The splits the suite checks for ``forget_split`` (forgetXX), in report order (its holdout split last)."""
    holdout = holdout_of(forget_split)
    return [forget_split, retain_of(forget_split), perturbed_of(forget_split), RETAIN_PERTURBED, REAL_AUTHORS, WORLD_FACTS,
            FULL, *([holdout] if holdout else [])]


_kind = split_kind  # the schema's kind of a split decides its expectations and which fields are encoded


# --------------------------------------------------------------------------- report
@dataclass
class ValidationReport:
    """The outcome of one suite run.

    ``failures``: one dict per failed expectation, ``{"split", "expectation",
    "column", "rows" (failing row ids, first 20; ``row N`` where the id is null),
    "count" (failing rows, or None for table-level checks), "observed",
    "expected", "message"}``. ``checked``: per split, rows and expectations run.
    ``truncation``: :func:`unlearn.models.truncation.truncation_table` of the gate's
    splits plus ``"tokenizer"`` (where it came from), or ``{"computed": False,
    "reason"}`` without a tokenizer; None when not asked for (``validate_splits_gx``).
    """

    success: bool
    failures: list[dict] = field(default_factory=list)
    checked: dict[str, dict] = field(default_factory=dict)
    forget_split: str | None = None
    elapsed_s: float = 0.0  # not part of to_dict(): the JSON stays byte-identical for the same data
    truncation: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "forget_split": self.forget_split,
            "n_expectations": sum(c["expectations"] for c in self.checked.values()),
            "n_failures": len(self.failures),
            "checked": self.checked,
            "failures": self.failures,
            "truncation": self.truncation,
        }

    def _render_truncation(self) -> list[str]:
        from ..models.truncation import split_summary, truncation_warning

        t = self.truncation
        if t is None:
            return []
        if not t.get("computed", True):
            return [f"  truncation: not counted ({t.get('reason')})"]
        head = (f"  truncation at model.max_length={t['max_length']} (tokenizer {t.get('tokenizer')}): "
                f"{t['truncated']} of {t['rows']} QA rows cut")
        lines = [head]
        if t["truncated"]:
            lines += [f"    {split_summary(n, per, t['max_length'])}" for n, per in t["splits"].items()
                      if any(c["truncated"] for c in per.values())]
            lines.append(f"    WARNING: {truncation_warning(t)}")
        return lines

    def render(self) -> str:
        """A readable multi-line report: which expectation failed on which split, and which rows."""
        n_exp = sum(c["expectations"] for c in self.checked.values())
        head = f"data validation ({self.forget_split}): "
        if self.success:
            return "\n".join([head + f"passed, {n_exp} expectations on {len(self.checked)} splits",
                              *self._render_truncation()])
        lines = [head + f"FAILED, {len(self.failures)} of {n_exp} expectations on {len(self.checked)} splits"]
        for i, f in enumerate(self.failures, 1):
            col = f" column '{f['column']}'" if f.get("column") else ""
            lines.append(f"  {i}. [{f['split']}] {f['expectation']}{col}")
            if f.get("message"):
                lines.append(f"     {f['message']}")
            if f.get("expected") is not None:
                lines.append(f"     expected: {f['expected']}")
            if f.get("observed") is not None:
                lines.append(f"     observed: {f['observed']}")
            if f.get("count"):
                shown = ", ".join(map(str, f.get("rows") or []))
                more = f" (first {len(f['rows'])})" if f["count"] > len(f.get("rows") or []) else ""
                lines.append(f"     {f['count']} failing row(s){more}: {shown}")
        return "\n".join(lines + self._render_truncation())


class ValidationFailed(DataError):
    """The suite failed; ``str(e)`` is the rendered report, ``e.report`` the :class:`ValidationReport`.

    A :class:`~unlearn.data.schema.DataError` (hence a :class:`~unlearn.errors.UserError`),
    so the CLI's friendly error handler prints it and exits with code 2.
    """

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.render())

    def __reduce__(self):
        return (ValidationFailed, (self.report,))


# --------------------------------------------------------------------------- frames
def _text_len(value: Any, strip: bool) -> Any:
    """Length of a string (stripped or not); None for a missing value; -1 for a non-string (fails every bound)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if not isinstance(value, str):
        return -1
    return len(value.strip() if strip else value)


def _n_list(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return len(value) if isinstance(value, list) else -1


def split_frame(rows: list[dict]) -> pd.DataFrame:
    """``rows`` as a DataFrame, with the helper columns the suite checks."""
    import pandas as pd

    df = pd.DataFrame.from_records([r if isinstance(r, dict) else {} for r in rows])
    df.insert(0, ROW, range(len(df)))
    for col, fn in (
        ("question_len_stripped", lambda v: _text_len(v, True)),
        ("answer_len_stripped", lambda v: _text_len(v, True)),
        ("answer_len", lambda v: _text_len(v, False)),
        ("n_perturbed", _n_list),
    ):
        src = {"question_len_stripped": "question", "n_perturbed": "perturbed_answer"}.get(col, "answer")
        if src in df.columns:
            df[col] = pd.array([fn(v) for v in df[src].tolist()], dtype="Int64")
    return df


# --------------------------------------------------------------------------- suite
def _gx_context():
    """An ephemeral GX context: in-memory stores, no data docs site, no analytics, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import: it logs at INFO
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _expectations(
    name: str,
    df: pd.DataFrame,
    *,
    forget_split: str,
    forget_ids: list[str],
    forget_authors: list[str],
    n_authors: int | None,
    manifest: dict | None,
    min_answer_chars: int,
    max_answer_chars: int,
    full_values: dict[str, list[str]] | None = None,
) -> list:
    """The GX expectations for split ``name`` (column expectations only for columns that exist)."""
    import great_expectations.expectations as gxe

    kind = _kind(name)
    cols = set(df.columns)
    required = list(REQUIRED)
    if kind == "perturbed":
        required += ["paraphrased_answer", "perturbed_answer"]
    elif kind == "utility":
        required += ["perturbed_answer"]
    exps: list = []
    for col in required:
        exps.append(gxe.ExpectColumnToExist(column=col))
        if col in cols:
            exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    if "id" in cols:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
    if "question_len_stripped" in cols:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="question_len_stripped", min_value=1))
    if "answer_len_stripped" in cols:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="answer_len_stripped", min_value=1))
    if "answer_len" in cols:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="answer_len", min_value=min_answer_chars, max_value=max_answer_chars))
    if kind in N_PERTURBED and "n_perturbed" in cols:
        n = N_PERTURBED[kind]
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="n_perturbed", min_value=n, max_value=n))
    if name in (retain_of(forget_split), RETAIN_PERTURBED):
        if "author_id" in cols and forget_authors:
            exps.append(gxe.ExpectColumnValuesToNotBeInSet(column="author_id", value_set=forget_authors))
        if "id" in cols and forget_ids:
            exps.append(gxe.ExpectColumnValuesToNotBeInSet(column="id", value_set=forget_ids))
    holdout = holdout_of(forget_split)
    if name == holdout:
        for col, values in (full_values or {}).items():
            if col in cols and values:
                exps.append(gxe.ExpectColumnValuesToNotBeInSet(column=col, value_set=values, meta={
                    "message": f"{col} must not be one of the {len(values)} of {FULL} (holdout authors are never trained on)"}))
    # Distinct-author checks, grouped by the expected count: GX drops an expectation equal to one
    # already in the suite (meta aside), so each count is asked once with every rule that wants it.
    author_rules: dict[int, list[str]] = {}
    entry = manifest.get(name) if manifest is not None else None
    if isinstance(entry, dict):
        if isinstance(entry.get("rows"), int):
            exps.append(gxe.ExpectTableRowCountToEqual(value=entry["rows"], meta={"rules": [f"rows in {MANIFEST}"]}))
        if isinstance(entry.get("authors"), int):
            author_rules.setdefault(entry["authors"], []).append(f"authors in {MANIFEST}")
    if n_authors and name in (forget_split, perturbed_of(forget_split), retain_of(forget_split), holdout):
        pct = int(forget_split[-2:])
        k = n_forget_authors(n_authors, pct)
        rule = f"n_forget_authors({n_authors}, {pct}) = {k} of the {n_authors} authors in full"
        if name == retain_of(forget_split):
            k, rule = n_authors - k, f"the {n_authors} authors in full minus n_forget_authors({n_authors}, {pct}) = {k}"
        elif name == holdout:
            rule = f"n_forget_authors({n_authors}, {pct}) = {k}, as many as {forget_split} (the {n_authors} of full)"
        author_rules.setdefault(k, []).append(rule)
    if "author_id" in cols:
        for k, rules in sorted(author_rules.items()):
            exps.append(gxe.ExpectColumnUniqueValueCountToBeBetween(column="author_id", min_value=k, max_value=k, meta={"rules": rules}))
    return exps


def _plain(v: Any) -> Any:
    """numpy / pandas scalars -> JSON-safe Python values."""
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _num(v: Any) -> Any:
    """GX stores bounds as floats: 5.0 -> 5."""
    v = _plain(v)
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _row_name(entry: dict) -> str:
    rid = entry.get("id")
    if rid is None or (isinstance(rid, float) and rid != rid):
        return f"row {_plain(entry.get(ROW))}"
    return str(rid)


_EXPECTED_KEYS = ("value", "min_value", "max_value")


def _failure(split: str, res: Any, forget_split: str) -> dict:
    d = res.to_json_dict()
    cfg = d.get("expectation_config") or {}
    kwargs = cfg.get("kwargs") or {}
    result = d.get("result") or {}
    exc = d.get("exception_info") or {}
    etype = cfg.get("type") or cfg.get("expectation_type")
    column = kwargs.get("column")
    expected = {k: _num(kwargs[k]) for k in _EXPECTED_KEYS if kwargs.get(k) is not None} or None
    message = None
    if etype == "expect_column_values_to_not_be_in_set" and (cfg.get("meta") or {}).get("message"):
        message = cfg["meta"]["message"]
        expected = None
    elif etype == "expect_column_values_to_not_be_in_set":
        vs = kwargs.get("value_set") or []
        what = "authors" if column == "author_id" else "row ids"
        message = f"{column} must not be one of the {len(vs)} {forget_split} {what} (forget and retain must be disjoint)"
        expected = None
    elif etype == "expect_column_unique_value_count_to_be_between":
        message = "distinct authors must equal " + "; ".join((cfg.get("meta") or {}).get("rules") or ["the expected count"])
    elif etype == "expect_table_row_count_to_equal":
        message = "row count must equal " + "; ".join((cfg.get("meta") or {}).get("rules") or ["the expected count"])
    elif etype == "expect_column_to_exist":
        message = "required column is missing"
    if exc.get("raised_exception"):
        message = f"expectation raised: {exc.get('exception_message')}"
    index = result.get("unexpected_index_list") or []
    rows = [_row_name(e) for e in index[:MAX_ROWS_SHOWN] if isinstance(e, dict)]
    count = result.get("unexpected_count")
    observed = result.get("observed_value")
    return {
        "split": split,
        "expectation": etype,
        "column": column,
        "rows": rows,
        "count": None if count is None else int(count),
        "observed": _plain(observed),
        "expected": expected,
        "message": message,
    }


def validate_splits_gx(
    splits: dict[str, list[dict]],
    *,
    forget_split: str,
    manifest: dict | None,
    min_answer_chars: int = MIN_ANSWER_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> ValidationReport:
    """Run the GX suite on the splits of ``forget_split`` and return the report (never raises on bad data).

    ``splits`` maps split names to lists of row dicts (as read from the JSON
    files, unvalidated); splits of the gate (:func:`gate_splits`) that are
    missing are reported as failures. ``manifest`` (``{split: {"rows", "authors"}}``)
    gives the declared sizes; None skips those checks.
    """
    t0 = time.perf_counter()
    names = gate_splits(forget_split)
    failures: list[dict] = []
    checked: dict[str, dict] = {}
    frames: dict[str, pd.DataFrame] = {}
    for name in names:
        rows = splits.get(name)
        if not isinstance(rows, list):
            failures.append({
                "split": name, "expectation": "split_exists", "column": None, "rows": [], "count": None,
                "observed": None if rows is None else type(rows).__name__, "expected": None,
                "message": "split is missing (expected a list of rows)" if rows is None else "expected a list of rows",
            })
            continue
        frames[name] = split_frame(rows)

    def col_values(name: str, col: str) -> list:
        df = frames.get(name)
        if df is None or col not in df.columns:
            return []
        return sorted({str(v) for v in df[col].tolist() if v is not None and not (isinstance(v, float) and v != v)})

    forget_ids = col_values(forget_split, "id")
    forget_authors = col_values(forget_split, "author_id")
    n_authors = len(col_values(FULL, "author_id")) or None
    full_values = {col: col_values(FULL, col) for col in ("author_id", "id", "question")}

    if frames:
        ctx = _gx_context()
        import great_expectations as gx

        source = ctx.data_sources.add_pandas("tofu_splits")
        for name, df in frames.items():
            exps = _expectations(
                name, df, forget_split=forget_split, forget_ids=forget_ids, forget_authors=forget_authors,
                n_authors=n_authors, manifest=manifest, min_answer_chars=min_answer_chars, max_answer_chars=max_answer_chars,
                full_values=full_values,
            )
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
                    failures.append(_failure(name, r, forget_split))
    order = {n: i for i, n in enumerate(names)}
    failures.sort(key=lambda f: order.get(f["split"], len(order)))  # stable: GX's order within a split
    return ValidationReport(
        success=not failures, failures=failures, checked={n: checked[n] for n in names if n in checked},
        forget_split=forget_split, elapsed_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- files
def result_path(p: Params) -> Path:
    return Path(p.reports_dir) / RESULT_FILE


def _load_split_file(out_dir: Path, name: str, manifest: dict) -> tuple[Any, dict | None]:
    """The raw rows of ``<out_dir>/<name>.json`` (sha256-checked, no schema check), or None and a failure saying why.

    Read by the data layer's one split-file reader; what it raises becomes a
    failure named after the check (``split_exists``, ``file_matches_manifest_sha256``,
    ``file_is_json``), since the gate reports every problem instead of stopping at the first.
    """
    def fail(exp: str, msg: str, observed: Any = None) -> tuple[None, dict]:
        return None, {"split": name, "expectation": exp, "column": None, "rows": [], "count": None,
                      "observed": observed, "expected": None, "message": msg}

    try:
        rows = load_split_file(out_dir, name, manifest)
    except SplitFileError as e:
        return fail(e.check, str(e), e.observed)
    if not isinstance(rows, list):
        return fail("split_exists", f"{out_dir / f'{name}.json'}: expected a JSON array of rows", type(rows).__name__)
    return rows, None


# The fields the pipeline encodes after the question, per kind of split: training, the reference cache
# and the memorisation summary encode the answers of forgetXX / retainXX / full; the evaluation scores
# the answers, paraphrases and perturbed answers of *_perturbed, and answers + perturbed answers of
# real_authors / world_facts. Fields that are never encoded (e.g. a paraphrase in full) are not counted.
TRUNCATION_FIELDS = {
    "qa": ("answer",),
    "perturbed": ("answer", "paraphrased_answer", "perturbed_answer"),
    "utility": ("answer", "perturbed_answer"),
}


def truncation_section(splits: dict[str, Any], tokenizer: Any, max_length: int, source: str | None,
                       fmt: Any = None) -> dict:
    """The result's ``truncation`` section for the gate's ``splits``; logs a warning when any row is cut.

    Counts the fields of :data:`TRUNCATION_FIELDS` in the prompt format ``fmt`` (None: plain; a chat preset
    whose tokenizer has no chat template fails here, before any training). ``tokenizer`` None: ``{"computed": False,
    "reason": source}`` and a warning, since the counts are then unknown (not zero).
    """
    from ..models.truncation import truncation_table, truncation_warning

    if tokenizer is None:
        reason = source or "no tokenizer given"
        log.warning("data validation: truncation not counted: %s", reason)
        return {"computed": False, "reason": reason, "max_length": int(max_length)}
    from ..models.template import PLAIN

    table = truncation_table(tokenizer, splits, max_length, {n: TRUNCATION_FIELDS[_kind(n)] for n in splits},
                             fmt=fmt or PLAIN)
    section = {"computed": True, "tokenizer": source, **table}
    msg = truncation_warning(table)
    if msg:
        log.warning("data validation: %s", msg)
    return section


def run_validation(p: Params, *, tokenizer: Any = None, tokenizer_source: str | None = None,
                   **bounds: int) -> ValidationReport:
    """Validate the split files in ``p.data.out_dir``; write ``<reports_dir>/validation/result.json`` (always).

    ``tokenizer``: the model's tokenizer, to count the rows cut at ``p.model.max_length``
    (the ``truncation`` section; ``tokenizer_source`` names where it came from, or, without
    a tokenizer, why there is none). ``bounds``: ``min_answer_chars`` / ``max_answer_chars``
    overrides. Raises FileNotFoundError when there is no manifest (the data stage has not run).
    """
    from ..io import write_json

    out_dir = Path(p.data.out_dir)
    manifest = read_manifest(out_dir)
    forget_split = p.data.forget_split
    splits: dict[str, Any] = {}
    file_failures: list[dict] = []
    for name in gate_splits(forget_split):
        rows, failure = _load_split_file(out_dir, name, manifest)
        if failure is not None:
            file_failures.append(failure)
        else:
            splits[name] = rows
    report = validate_splits_gx(splits, forget_split=forget_split, manifest=manifest, **bounds)
    if file_failures:  # reported once, in place of the generic "split is missing"
        bad = {f["split"] for f in file_failures}
        rest = [f for f in report.failures if not (f["split"] in bad and f["expectation"] == "split_exists")]
        order = {n: i for i, n in enumerate(gate_splits(forget_split))}
        report.failures = sorted(file_failures + rest, key=lambda f: order.get(f["split"], len(order)))
        report.success = False
    from ..models.template import train_format

    report.truncation = truncation_section(splits, tokenizer, p.model.max_length, tokenizer_source,
                                           fmt=train_format(p))
    write_json(result_path(p), report.to_dict())
    log.info("data validation %s in %.1fs: %s", "passed" if report.success else "FAILED", report.elapsed_s, result_path(p))
    return report
