"""Load MUSE-News from one of three sources into the MUSE schema (every split of ``MUSE_SPLIT_NAMES``).

* ``synthetic``: :func:`~unlearn.data.muse_synthetic.generate_muse` (no files, no network).
* ``local``: a directory laid out as MUSE-News is distributed (``data.local_dir``,
  e.g. ``../shared/data/muse/news``)::

      sust/forget_1.json .. forget_4.json   article strings      -> fold1 .. fold4
      privleak/forget.json, retain.json, holdout.json           -> privleak_forget / _retain / _holdout
      verbmem/forget.json                   {prompt, gt}         -> verbmem_forget
      knowmem/forget_qa.json, forget_qa_icl.json,
              retain_qa.json, retain_qa_icl.json {question, answer} -> knowmem_forget_qa, ...
      raw/forget.json (optional)            must equal sust/forget_1.json

* ``hub``: ``datasets.load_dataset(hub_id, <subset>, split=<split>)`` for the same
  files (subsets ``sust``, ``privleak``, ``verbmem``, ``knowmem``); fails within
  seconds, naming the local alternative, when the hub cannot be reached.

Real MUSE rows carry only text, so ids are assigned here from the row's position in
its file: ``fold1-0007`` is row 7 of ``sust/forget_1.json``, ``pf-``/``pr-``/``ph-``
(privleak forget/retain/holdout), ``vm-``, ``kf-``/``kfi-``/``kr-``/``kri-`` (knowmem).

What holds on the real files, and is checked here (a DataError if not):

* ``raw/forget.json`` is ``sust/forget_1.json`` (the forget set is fold1);
* every ``privleak/forget`` text is a passage of ``raw/forget.txt`` (fold1's
  articles joined by blank lines): they are 2048-token chunks, not articles, so
  "privleak_forget is a subset of fold1" holds for the text, not the rows;
* no ``privleak/retain`` or ``privleak/holdout`` text is an article of a fold, and
  the two share none (:func:`~unlearn.data.schema.validate_muse_splits`).

What does not hold, and is repaired here: the folds are *not* disjoint by text
(each holds 31-36 repeated articles, any two share 42-62, and fold1 has one empty
article). Since the retain text of a run is the later folds, an article repeated in
a later fold would be trained on by the retain model while being forgotten, so each
article is kept once, in the earliest fold it occurs in (row order); empty
articles are dropped. The ids keep the original row numbers (so gaps show what was
dropped) and the counts are logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DataCfg, MuseSyntheticCfg
from .loaders import _decode, _env_offline, _offline_flags, _probe, _row_at
from .muse_synthetic import generate_muse
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
from .schema import DataError, passage_test, require_text, split_kind, validate_muse_splits

log = logging.getLogger("unlearn")

LOCAL_FILES: dict[str, str] = {
    **{fold: f"sust/forget_{k}.json" for k, fold in enumerate(MUSE_FOLDS, 1)},
    PRIVLEAK_FORGET: "privleak/forget.json",
    PRIVLEAK_RETAIN: "privleak/retain.json",
    PRIVLEAK_HOLDOUT: "privleak/holdout.json",
    VERBMEM_FORGET: "verbmem/forget.json",
    KNOWMEM_FORGET: "knowmem/forget_qa.json",
    KNOWMEM_FORGET_ICL: "knowmem/forget_qa_icl.json",
    KNOWMEM_RETAIN: "knowmem/retain_qa.json",
    KNOWMEM_RETAIN_ICL: "knowmem/retain_qa_icl.json",
}
"""Split name -> its file in a MUSE-News directory (relative to ``data.local_dir``)."""
RAW_FORGET = "raw/forget.json"
"""Optional: MUSE's raw forget corpus, which must equal ``sust/forget_1.json`` when present."""

HUB_CONFIGS: dict[str, tuple[str, str]] = {
    **{fold: ("sust", f"forget_{k}") for k, fold in enumerate(MUSE_FOLDS, 1)},
    PRIVLEAK_FORGET: ("privleak", "forget"),
    PRIVLEAK_RETAIN: ("privleak", "retain"),
    PRIVLEAK_HOLDOUT: ("privleak", "holdout"),
    VERBMEM_FORGET: ("verbmem", "forget"),
    KNOWMEM_FORGET: ("knowmem", "forget_qa"),
    KNOWMEM_FORGET_ICL: ("knowmem", "forget_qa_icl"),
    KNOWMEM_RETAIN: ("knowmem", "retain_qa"),
    KNOWMEM_RETAIN_ICL: ("knowmem", "retain_qa_icl"),
}
"""Split name -> (subset, split) of the hub dataset (the MUSE-News card: ``load_dataset(id, subset, split=split)``)."""

ID_PREFIX: dict[str, str] = {
    **{fold: fold for fold in MUSE_FOLDS},
    PRIVLEAK_FORGET: "pf", PRIVLEAK_RETAIN: "pr", PRIVLEAK_HOLDOUT: "ph", VERBMEM_FORGET: "vm",
    KNOWMEM_FORGET: "kf", KNOWMEM_FORGET_ICL: "kfi", KNOWMEM_RETAIN: "kr", KNOWMEM_RETAIN_ICL: "kri",
}
LOCAL_DIR_HINT = "../shared/data/muse/news"
HUB_HINT = f"offline? use data.source=local with data.local_dir={LOCAL_DIR_HINT} (a copy of MUSE-News's files)"


def load_muse(data: DataCfg, synthetic: MuseSyntheticCfg, max_articles: int | None = None) -> dict[str, list[dict]]:
    """Every MUSE split from ``data.source`` (synthetic | local | hub), validated (:func:`validate_muse_splits`).

    ``data.local_dir`` is relative to the current directory (the project root when
    run by DVC); ``synthetic`` is used by the generator only; ``max_articles``
    (``muse.max_articles``) cuts the real data down to a CPU-sized run (:func:`subset_muse`).
    """
    if data.source == "synthetic":
        return validate_muse_splits(generate_muse(synthetic))
    if data.source == "local":
        splits = load_muse_local(data.local_dir)
    elif data.source == "hub":
        splits = load_muse_hub(data.hub_id)
    else:
        raise DataError(f"unknown data source {data.source!r}; expected synthetic, local or hub")
    return subset_muse(splits, max_articles) if max_articles else splits


def subset_muse(splits: Mapping[str, list[dict]], max_articles: int) -> dict[str, list[dict]]:
    """The first ``max_articles`` articles of each fold and of ``privleak_retain``, and the evaluation rows the kept
    text still supports: the privleak_forget passages and VerbMem prompts found in the kept fold1 text, and the
    KnowMem questions whose answer occurs in it (forget QA: fold1; retain QA: privleak_retain).

    Why: MUSE-News is about 3 million tokens; a model trained from scratch on 2 CPU
    cores can learn a few hundred thousand. A question about an article that was cut
    away measures nothing (neither the target nor the retain model could know it), so
    such rows go too; the holdout and few-shot rows are kept whole. The counts kept
    are logged, and the README's real-data table states them.
    """
    out = {name: list(rows) for name, rows in splits.items()}
    for name in (*MUSE_FOLDS, PRIVLEAK_RETAIN):
        out[name] = out[name][:max_articles]
    fold1 = [r["text"] for r in out[MUSE_FOLDS[0]]]
    in_fold1 = passage_test(fold1)
    joined_f1 = "\n\n".join(fold1)
    joined_ret = "\n\n".join(r["text"] for r in out[PRIVLEAK_RETAIN])
    out[PRIVLEAK_FORGET] = [r for r in out[PRIVLEAK_FORGET] if in_fold1(r["text"])]
    out[VERBMEM_FORGET] = [r for r in out[VERBMEM_FORGET] if in_fold1(r["prompt"])]
    out[KNOWMEM_FORGET] = [r for r in out[KNOWMEM_FORGET] if r["answer"].strip() in joined_f1]
    out[KNOWMEM_RETAIN] = [r for r in out[KNOWMEM_RETAIN] if r["answer"].strip() in joined_ret]
    for name in (PRIVLEAK_FORGET, VERBMEM_FORGET, KNOWMEM_FORGET, KNOWMEM_RETAIN):
        if not out[name]:
            raise DataError(f"muse.max_articles={max_articles} keeps no {name} row (none is about the kept articles): "
                            "raise it")
    log.warning("muse.max_articles=%d: kept %s", max_articles,
                ", ".join(f"{name} {len(out[name])}/{len(splits[name])}" for name in MUSE_SPLIT_NAMES))
    return validate_muse_splits({name: out[name] for name in MUSE_SPLIT_NAMES})


# --- local files -------------------------------------------------------------------------------


def _layout() -> str:
    return ", ".join(LOCAL_FILES.values()) + f" (and optionally {RAW_FORGET})"


def read_json_array(path: str | Path) -> list[Any]:
    """The JSON array in ``path``; DataError (with line, column and row) when it is not UTF-8 JSON or not an array."""
    path = Path(path)
    text = _decode(path)
    if not text.strip():
        raise DataError("empty file: expected a JSON array", file=str(path))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno}, char {e.pos})",
                        file=str(path), line=e.lineno, row=_row_at(text, e.pos)) from None
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array, got a JSON {type(value).__name__}", file=str(path))
    return value


def load_muse_local(local_dir: str | Path) -> dict[str, list[dict]]:
    """Every MUSE split from a directory laid out as MUSE-News (see the module docstring)."""
    directory = Path(local_dir)
    if not directory.is_dir():
        raise DataError(
            f"MUSE-News directory not found (resolved: {directory.absolute()}); expected a directory holding {_layout()}",
            file=str(directory),
        )
    missing = [rel for rel in LOCAL_FILES.values() if not (directory / rel).is_file()]
    if missing:
        raise DataError(
            f"missing file(s) {', '.join(missing)}; a MUSE-News directory holds {_layout()}", file=str(directory)
        )
    raw = {name: read_json_array(directory / rel) for name, rel in LOCAL_FILES.items()}
    labels = {name: str(directory / rel) for name, rel in LOCAL_FILES.items()}
    raw_forget = directory / RAW_FORGET
    if raw_forget.is_file() and read_json_array(raw_forget) != raw[MUSE_FOLDS[0]]:
        raise DataError(f"differs from {labels[MUSE_FOLDS[0]]}; MUSE's forget set (raw/forget) is fold1 (sust/forget_1)",
                        file=str(raw_forget))
    return assemble_muse(raw, labels=labels)


# --- ids, cleaning, checks ---------------------------------------------------------------------


def _article(r: Any, *, file: str, row_index: int) -> str:
    """An article: a JSON string (MUSE's files) or an object with a string ``text`` (the hub's rows)."""
    if isinstance(r, str):
        return r
    if isinstance(r, Mapping):
        if "text" not in r:
            present = ", ".join(sorted(map(str, r))) or "none"
            raise DataError(f"missing required field (an article is a string or an object with 'text'; fields present: {present})",
                            file=file, row=row_index, field="text")
        if not isinstance(r["text"], str):
            got = "null" if r["text"] is None else type(r["text"]).__name__
            raise DataError(f"expected the article as a string, got {got}", file=file, row=row_index, field="text")
        return r["text"]
    got = "null" if r is None else type(r).__name__
    raise DataError(f"expected an article (a JSON string, or an object with 'text'), got {got}", file=file, row=row_index)


def assemble_muse(raw: Mapping[str, list[Any]], *, labels: Mapping[str, str] | None = None) -> dict[str, list[dict]]:
    """Turn MUSE's raw records per split (article strings, {prompt, gt}, {question, answer}) into the schema.

    ``raw`` must hold every split of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES`;
    ``labels`` names each split's file for error messages. Checks that every
    privleak_forget text is a passage of fold1's joined articles, repairs the folds
    (each article once, in its earliest fold; no empty article) and validates the result.
    """
    labels = {name: (labels or {}).get(name, name) for name in MUSE_SPLIT_NAMES}
    lacking = [name for name in MUSE_SPLIT_NAMES if name not in raw]
    if lacking:
        raise DataError(f"missing MUSE split(s): {', '.join(lacking)}")
    articles = {
        name: [_article(r, file=labels[name], row_index=i) for i, r in enumerate(raw[name])]
        for name in MUSE_SPLIT_NAMES if split_kind(name) == "text"
    }
    fold1 = MUSE_FOLDS[0]
    corpus = "\n\n".join(articles[fold1])  # MUSE's raw/forget.txt
    whole = set(articles[fold1])
    for i, text in enumerate(articles[PRIVLEAK_FORGET]):
        if text not in whole and text not in corpus:
            raise DataError(
                f"not a passage of {labels[fold1]} (its articles joined by blank lines, MUSE's raw/forget.txt); "
                "privleak_forget must be forget-set text",
                file=labels[PRIVLEAK_FORGET], row=i, field="text",
            )

    splits: dict[str, list[dict]] = {}
    seen: dict[str, str] = {}  # article text -> id of the fold row that keeps it
    for fold in MUSE_FOLDS:
        rows, empty, repeated = [], 0, 0
        for i, text in enumerate(articles[fold]):
            if not text.strip():
                empty += 1
            elif text in seen:
                repeated += 1
            else:
                seen[text] = f"{fold}-{i:04d}"
                rows.append({"id": seen[text], "text": text})
        if empty or repeated:
            log.warning("MUSE %s (%s): dropped %d empty and %d repeated article(s) (each article is kept once, in the "
                        "earliest fold), %d of %d kept", fold, labels[fold], empty, repeated, len(rows), len(articles[fold]))
        splits[fold] = rows
    for name in (PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT):
        splits[name] = [{"id": f"{ID_PREFIX[name]}-{i:04d}", "text": t} for i, t in enumerate(articles[name])]
    for name, fields in ((VERBMEM_FORGET, ("prompt", "gt")),
                         *((n, ("question", "answer")) for n in (KNOWMEM_FORGET, KNOWMEM_FORGET_ICL, KNOWMEM_RETAIN, KNOWMEM_RETAIN_ICL))):
        rows = []
        for i, r in enumerate(raw[name]):
            if not isinstance(r, Mapping):
                got = "null" if r is None else type(r).__name__
                raise DataError(f"expected a JSON object {{{', '.join(fields)}}}, got {got}", file=labels[name], row=i)
            rows.append({"id": f"{ID_PREFIX[name]}-{i:04d}",
                         **{f: require_text(r, f, file=labels[name], row_index=i) for f in fields}})
        splits[name] = rows
    return validate_muse_splits({name: splits[name] for name in MUSE_SPLIT_NAMES}, origin=labels)


# --- hub -------------------------------------------------------------------------------------------


def load_muse_hub(hub_id: str, *, connect_timeout_s: float = 3.0) -> dict[str, list[dict]]:
    """Every MUSE split via ``datasets.load_dataset(hub_id, subset, split=split)`` (:data:`HUB_CONFIGS`).

    With HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set only the local ``datasets``
    cache is used; otherwise the hub is probed first, so that no network means a
    DataError in seconds (naming ``data.source=local``), not a hang.
    """

    def fail(reason: str) -> DataError:
        return DataError(f"could not load {hub_id} from the Hugging Face hub ({reason}); {HUB_HINT}")

    offline = _env_offline()
    try:
        import datasets
        import huggingface_hub.constants as hcfg
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise fail(f"the datasets library is not importable: {e}") from None
    if not offline:
        reason = _probe(getattr(hcfg, "ENDPOINT", "https://huggingface.co"), connect_timeout_s)
        if reason:
            raise fail(f"{reason}; set HF_HUB_OFFLINE=1 to use a local datasets cache")
    raw: dict[str, list[Any]] = {}
    with _offline_flags(offline):
        for name, (subset, split) in HUB_CONFIGS.items():
            try:
                ds = datasets.load_dataset(hub_id, subset, split=split)
            except Exception as e:  # noqa: BLE001 - any failure here means "no hub data"; say so in one line
                first = (str(e).strip().splitlines() or [""])[0]
                why = f"HF_HUB_OFFLINE is set and {subset}/{split} is not cached: " if offline else f"loading {subset}/{split}: "
                raise fail(f"{why}{type(e).__name__}: {first}") from None
            raw[name] = [dict(r) for r in ds]
    labels = {name: f"hf://datasets/{hub_id} ({subset}, split {split})" for name, (subset, split) in HUB_CONFIGS.items()}
    return assemble_muse(raw, labels=labels)
