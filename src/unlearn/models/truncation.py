"""How many QA rows :func:`~unlearn.models.formatting.encode_qa` cuts at ``model.max_length``, per split and field.

Truncation used to be silent: a cut answer is trained and scored on part of its
tokens only, so a too-small ``model.max_length`` quietly changes every metric.
The validation gate (:mod:`unlearn.data.validate`) and every evaluation
(:mod:`unlearn.eval.tofu_metrics`) count it with :func:`truncation_table` and warn
(:func:`truncation_warning`) when any row is cut; it is a warning, not a
failure, because a cut row is still a valid (shorter) example.

Every text that is encoded after the question counts, each as one row: the
answer, the paraphrased answer and each perturbed answer (the evaluation scores
all of them under the question; see ``eval/tofu_metrics.py``'s ``split_scores``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .formatting import qa_lengths
from .template import PLAIN, QAFormat

FIELDS = ("answer", "paraphrased_answer", "perturbed_answer")
MAX_CUT_FRACTION = 0.01  # the suggested max_length cuts fewer than this share of every split's rows


def field_pairs(rows: Sequence[Any], field: str) -> tuple[list[str], list[str]]:
    """(questions, texts) encoded for ``field`` of ``rows``: one pair per answer, paraphrase or perturbed answer.

    The same pairs the evaluation scores: every answer, every non-empty paraphrase, every
    perturbed answer. Rows whose question or text is missing or not a string are skipped
    (the validation gate reports those itself; counting must not crash on them).
    """
    qs: list[str] = []
    texts: list[str] = []
    for r in rows:
        if not isinstance(r, Mapping) or not isinstance(r.get("question"), str):
            continue
        v = r.get(field)
        values = (v if isinstance(v, list) else []) if field == "perturbed_answer" else [v]
        for t in values:
            if isinstance(t, str) and (t or field == "answer"):
                qs.append(r["question"])
                texts.append(t)
    return qs, texts


def min_length_for(lengths: Sequence[int], max_fraction: float = MAX_CUT_FRACTION) -> int:
    """The smallest ``max_length`` that cuts fewer than ``max_fraction`` of the rows with these ``lengths``.

    With ``m`` = the most rows allowed to be cut (the largest integer below
    ``max_fraction * n``), that is the ``(m + 1)``-th longest length.
    """
    if not lengths:
        return 0
    m = max(math.ceil(max_fraction * len(lengths)) - 1, 0)
    return sorted(lengths, reverse=True)[m]


def truncation_table(
    tokenizer,
    splits: Mapping[str, Sequence[Any]],
    max_length: int,
    fields: Mapping[str, Sequence[str]] | Sequence[str] = FIELDS,
    fmt: QAFormat = PLAIN,
) -> dict[str, Any]:
    """Per split and field: rows encoded, rows cut at ``max_length``, their percentage and the longest row.

    ``fields``: the fields to count, for every split or per split name (a split missing
    from the mapping counts :data:`FIELDS`). A field with no rows in a split is left out.
    Returns ``{"max_length", "splits": {split: {field: {"rows", "truncated", "percent",
    "max_tokens"}}}, "rows", "truncated", "suggested_max_length"}``, where
    ``suggested_max_length`` is the smallest ``max_length`` that cuts under 1 % of the
    rows of every split and field (:func:`min_length_for`). Rows are counted in the prompt format ``fmt``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    total = cut = 0
    suggested = 0
    for name, rows in splits.items():
        if not isinstance(rows, (list, tuple)):
            continue
        names = fields.get(name, FIELDS) if isinstance(fields, Mapping) else fields
        per: dict[str, dict[str, Any]] = {}
        for f in names:
            qs, texts = field_pairs(rows, f)
            if not qs:
                continue
            lengths = qa_lengths(tokenizer, qs, texts, fmt=fmt)
            k = sum(1 for n in lengths if n > max_length)
            per[f] = {"rows": len(lengths), "truncated": k, "percent": round(100.0 * k / len(lengths), 2),
                      "max_tokens": max(lengths)}
            total += len(lengths)
            cut += k
            suggested = max(suggested, min_length_for(lengths))
        out[name] = per
    return {"max_length": int(max_length), "splits": out, "rows": total, "truncated": cut,
            "suggested_max_length": suggested}


def truncated_parts(table: Mapping[str, Any]) -> list[str]:
    """``"<split> <field> <pct> % (<k>/<n>)"`` for every split and field with cut rows."""
    return [f"{name} {f} {c['percent']:.2f} % ({c['truncated']}/{c['rows']})"
            for name, per in table.get("splits", {}).items() for f, c in per.items() if c["truncated"]]


def truncation_warning(table: Mapping[str, Any]) -> str | None:
    """The warning for a table with cut rows (None when nothing is cut): which splits, how much, what to set."""
    if not table.get("truncated"):
        return None
    fix = table["suggested_max_length"]
    advice = (f"model.max_length={fix} would cut under 1 % of every split's rows (a from-scratch model also "
              "needs model.arch.max_position_embeddings >= it)") if fix > table["max_length"] else (
              "that is under 1 % of every split's rows")
    return (f"{table['truncated']} of {table['rows']} QA rows are longer than model.max_length={table['max_length']} "
            f"tokens and are cut (answer shortened, EOS kept): {'; '.join(truncated_parts(table))}. {advice}")


def split_summary(name: str, per: Mapping[str, Mapping[str, Any]], max_length: int) -> str:
    """One line for one split: ``"<split> at max_length L: answer k/n cut (p %), ..."``."""
    parts = [f"{f} {c['truncated']}/{c['rows']} cut ({c['percent']:.2f} %)" for f, c in per.items()]
    return f"{name} at max_length {max_length}: " + (", ".join(parts) if parts else "no rows")
