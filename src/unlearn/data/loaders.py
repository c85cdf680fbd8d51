"""Load TOFU from one of three sources into the common schema.

* ``synthetic``: :func:`~unlearn.data.synthetic.generate_tofu` (no files, no network).
* ``local``: a directory of TOFU files as distributed (``full.json``,
  ``forget10_perturbed.json``, ``idontknow.jsonl``, ...), JSON or JSON Lines.
* ``hub``: ``datasets.load_dataset(hub_id, <split name>)``; fails within seconds,
  with a hint to use ``local``, when the hub cannot be reached.

Real TOFU rows carry only text, so ids are assigned here: ``full`` lists 20
questions per author in author order, which gives ``author_id = row // 20`` and
``id = tofu-<row of full>``; rows of every other file are matched to ``full`` by
their (question, answer) pair (one question occurs twice in ``full`` with
different answers, so the question alone is not a key). The holdout authors
are not in ``full``: ``holdout10`` lists them the same way (20 questions per
author), which gives ``author_id = tofu-ha<row // 20>`` and ``id = tofu-h<row>``,
and holdout05 / holdout01 (its first rows) are matched to ``holdout10`` by
(question, answer). Whatever the source, the result goes through
:func:`~unlearn.data.schema.validate_splits`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import DataCfg
from .names import (
    FORGET_PCTS,
    FULL,
    HOLDOUT_SPLITS,
    IDK,
    PERTURBED_SPLITS,
    QA_SPLITS,
    REAL_AUTHORS,
    RETAIN_PERTURBED,
    SPLIT_NAMES,
    UTILITY_SPLITS,
    WORLD_FACTS,
)
from .schema import DataError, require_text, split_kind, validate_rows, validate_splits
from .splits import author_order, n_forget_authors, split_by_authors
from .synthetic import IDK_RESPONSES, generate_tofu

TOFU_QA_PER_AUTHOR = 20
"""Real TOFU: 200 authors x 20 questions, listed author by author in ``full``."""

FILE_STEMS: dict[str, str] = {
    **{name: name for name in QA_SPLITS + PERTURBED_SPLITS + HOLDOUT_SPLITS},
    REAL_AUTHORS: "real_authors_perturbed",
    WORLD_FACTS: "world_facts_perturbed",
    IDK: "idontknow",
}
"""Split name -> TOFU file stem (``.json`` or ``.jsonl``) in a local directory, and hub config name."""

UTILITY_IDS = {REAL_AUTHORS: ("ra", "real"), WORLD_FACTS: ("wf", "world")}
HOLDOUT_ALL = HOLDOUT_SPLITS[-1]
"""``holdout10``: every holdout author. Required (real TOFU and the hub have it): without it there are no
non-members, and the privacy-leakage metrics would silently vanish; holdout01/05 are derived from it when absent."""
REQUIRED_SPLITS = (FULL, *UTILITY_SPLITS, HOLDOUT_ALL)
HUB_HINT = "offline? use data.source=local with data.local_dir=<dir of TOFU JSON files>"


def load_tofu(
    source: str,
    *,
    local_dir: str | Path = "../shared/data/tofu",
    hub_id: str = "locuslab/TOFU",
    n_authors: int = 40,
    qa_per_author: int = 20,
    seed: int = 0,
) -> dict[str, list]:
    """Every split (and ``idk``) from ``source`` in the common, validated schema.

    ``n_authors`` / ``seed`` only matter for ``synthetic``; ``qa_per_author`` is
    the generator's count for ``synthetic`` and the row -> author grouping of
    ``full`` for ``local`` / ``hub`` (20 for real TOFU).
    """
    if source == "synthetic":
        return validate_splits(generate_tofu(n_authors, qa_per_author, seed))
    if source == "local":
        return load_local(local_dir, qa_per_author=qa_per_author)
    if source == "hub":
        return load_hub(hub_id, qa_per_author=qa_per_author)
    raise DataError(f"unknown data source {source!r}; expected synthetic, local or hub")


def load_from_config(cfg: DataCfg, *, base_dir: str | Path | None = None) -> dict[str, list]:
    """:func:`load_tofu` driven by ``params.yaml``'s ``data`` section.

    A relative ``local_dir`` is resolved against ``base_dir`` (default: the
    current directory, i.e. the project root when run by DVC). For local/hub,
    rows are grouped into authors by TOFU's 20 questions per author; the
    ``synthetic`` section applies to the generator only.
    """
    local_dir = Path(cfg.local_dir)
    if base_dir is not None and not local_dir.is_absolute():
        local_dir = Path(base_dir) / local_dir
    syn = cfg.synthetic
    qa = syn.qa_per_author if cfg.source == "synthetic" else TOFU_QA_PER_AUTHOR
    return load_tofu(cfg.source, local_dir=local_dir, hub_id=cfg.hub_id, n_authors=syn.n_authors, qa_per_author=qa, seed=syn.seed)


# --- reading files --------------------------------------------------------------------------


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (bad byte at offset {e.start})", file=str(path)) from None


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON or JSON Lines file, with the format told from the content.

    Accepted: one JSON array (``json.load``); JSON Lines (one object per line,
    ``.jsonl`` or any file starting with ``{``); and the Hugging Face export
    layout of TOFU's upstream files (several JSON arrays, one per line).
    Errors give the line (JSON Lines) or line/column/char position (JSON).
    """
    path = Path(path)
    text = _decode(path)
    if not text.strip():
        raise DataError("empty file: expected a JSON array (or JSON Lines) of objects with fields 'question', 'answer'", file=str(path))
    if path.suffix != ".jsonl" and not text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = several top-level values: read it line by line below
                raise DataError(
                    f"malformed JSON: {e.msg} (column {e.colno}, char {e.pos})",
                    file=str(path), line=e.lineno, row=_row_at(text, e.pos),
                ) from None
        else:
            records = obj if isinstance(obj, list) else [obj] if isinstance(obj, dict) else None
            if records is None:
                raise DataError(f"expected a JSON array of objects, got a JSON {type(obj).__name__}", file=str(path))
            if not records:
                raise DataError("no rows: the JSON array is empty", file=str(path))
            return records
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"malformed JSON Lines record: {e.msg} (column {e.colno})", file=str(path), line=lineno, row=len(records)
            ) from None
        if isinstance(obj, list):
            records.extend(obj)
        elif isinstance(obj, dict):
            records.append(obj)
        else:
            raise DataError(f"expected a JSON object, got a JSON {type(obj).__name__}", file=str(path), line=lineno, row=len(records))
    return records


def _row_at(text: str, pos: int) -> int | None:
    """Best-effort 0-based index of the array element holding a JSON syntax error at ``pos``.

    Decodes the top-level array element by element; the first element that does
    not decode cleanly (or is not followed by ``,``/``]``) is the culprit.
    None when the text is not an array.
    """
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        return None
    decoder = json.JSONDecoder()
    i, n = start + 1, 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= pos or i >= len(text):
            return n
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return n
        if end > pos:
            return n
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] not in ",]":
            return n + 1
        if text[i] == "]":
            return n
        i, n = i + 1, n + 1


def read_text_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a plain-text file such as TOFU's ``idontknow.jsonl`` (plain text despite the name).

    A line that is a JSON string literal (``"I don't know."``) is decoded, so a
    genuinely JSON-encoded variant of the file reads the same.
    """
    path = Path(path)
    out = []
    for line in _decode(path).splitlines():
        s = line.strip()
        if len(s) >= 2 and s[0] == s[-1] == '"':
            try:
                s = json.loads(s)
            except json.JSONDecodeError:
                pass
        if s:
            out.append(s)
    if not out:
        raise DataError("empty file: expected one refusal string per line", file=str(path))
    return out


def _find(directory: Path, stem: str) -> Path | None:
    found = [p for p in (directory / f"{stem}.json", directory / f"{stem}.jsonl") if p.is_file()]
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} exist; keep one", file=str(directory / stem))
    return found[0] if found else None


def _expected_files() -> str:
    required = REQUIRED_SPLITS
    optional = [f"{FILE_STEMS[n]}.json" for n in (*QA_SPLITS, *PERTURBED_SPLITS, *HOLDOUT_SPLITS) if n not in required]
    return (
        f"{', '.join(FILE_STEMS[n] + '.json' for n in required)} (required) and optionally "
        f"{', '.join([*optional, 'idontknow.jsonl'])}"
        " (each .json or .jsonl; missing forget/retain splits are derived from full, missing *_perturbed ones from the"
        f" perturbed files present, missing smaller holdout splits from {HOLDOUT_ALL})"
    )


def load_local(local_dir: str | Path, *, qa_per_author: int = TOFU_QA_PER_AUTHOR) -> dict[str, list]:
    """All splits from a directory of TOFU files (``.json`` or ``.jsonl`` each).

    Required: ``full``, the utility files (``real_authors_perturbed``,
    ``world_facts_perturbed``) and ``holdout10`` (the authors no model trains
    on: TOFU ships it, and without it the privacy-leakage metrics could not be
    computed; holdout01/05 are its first authors and derived from it when
    absent). Missing forget/retain files are derived from
    ``full`` by TOFU's last-authors rule; missing *_perturbed files are taken
    from the rows of the perturbed files present (e.g. forget05_perturbed from
    forget10_perturbed) when these cover them. ``idontknow.jsonl`` missing ->
    the built-in refusal strings.
    """
    directory = Path(local_dir)
    if not directory.is_dir():
        raise DataError(
            f"TOFU data directory not found (resolved: {directory.absolute()}); expected a directory holding {_expected_files()}",
            file=str(directory),
        )
    paths = {name: _find(directory, stem) for name, stem in FILE_STEMS.items()}
    missing = [f"{FILE_STEMS[n]}.json" for n in REQUIRED_SPLITS if paths[n] is None]
    if missing:
        raise DataError(
            f"missing required file(s) {', '.join(missing)} (.json or .jsonl); a TOFU directory holds {_expected_files()}",
            file=str(directory),
        )
    raw = {name: read_records(path) for name, path in paths.items() if path is not None and name != IDK}
    # Absent files are labelled with the path they would have, so "missing, cannot be derived" names it.
    labels = {name: str(path or directory / f"{FILE_STEMS[name]}.json") for name, path in paths.items()}
    idk = read_text_lines(paths[IDK]) if paths[IDK] is not None else None
    return assemble_tofu(raw, labels=labels, idk=idk, qa_per_author=qa_per_author)


# --- ids, derivation ---------------------------------------------------------------------------


def assemble_tofu(
    raw: Mapping[str, list[Any]],
    *,
    labels: Mapping[str, str] | None = None,
    idk: list[str] | None = None,
    qa_per_author: int = TOFU_QA_PER_AUTHOR,
) -> dict[str, list]:
    """Turn raw TOFU records (question/answer[/paraphrased_answer/perturbed_answer]) per split into the schema.

    ``raw`` must hold ``full``, ``real_authors``, ``world_facts`` and
    ``holdout10``; other splits are derived when absent (see
    :func:`load_local`). ``labels`` names each split's file for error messages.
    """
    labels = {name: labels.get(name, name) if labels else name for name in (*SPLIT_NAMES, IDK)}
    full_label = labels[FULL]
    full_raw = raw[FULL]
    if qa_per_author < 1:
        raise DataError(f"qa_per_author must be >= 1, got {qa_per_author}")
    if len(full_raw) % qa_per_author:
        raise DataError(
            f"has {len(full_raw)} rows, not a multiple of {qa_per_author} questions per author; "
            f"author ids are derived as row // {qa_per_author}",
            file=full_label,
        )
    width = max(4, len(str(len(full_raw) - 1)))
    a_width = max(3, len(str(len(full_raw) // qa_per_author - 1)))
    index: dict[tuple[str, str], int] = {}
    full: list[dict] = []
    for i, r in enumerate(full_raw):
        key = _qa_key(r, file=full_label, row_index=i)
        if key in index:
            raise DataError(
                f"same question and answer as row {index[key]}; rows of the other files are matched to full by this pair, so it must be unique",
                file=full_label, row=i, field="answer",
            )
        index[key] = i
        full.append(_row(r, f"tofu-{i:0{width}d}", f"tofu-a{i // qa_per_author:0{a_width}d}"))

    # Each file is validated as soon as it is read, so an error names that file, not a split derived from it.
    splits: dict[str, list] = {FULL: validate_rows(full, file=full_label, kind="qa")}
    for name in QA_SPLITS[1:] + PERTURBED_SPLITS:
        if name in raw:
            rows = [_match(r, full, index, file=labels[name], row_index=i) for i, r in enumerate(raw[name])]
            splits[name] = validate_rows(rows, file=labels[name], kind=split_kind(name))
    derived = split_by_authors(full)
    for name in QA_SPLITS[1:]:
        if name not in splits:
            splits[name] = derived[name]
            labels[name] = f"{full_label} (derived {name})"
    pool: dict[str, dict] = {}
    for name in PERTURBED_SPLITS:
        for r in splits.get(name, []):
            pool.setdefault(r["id"], r)
    for name in PERTURBED_SPLITS:
        if name in splits:
            continue
        wanted = derived[RETAIN_PERTURBED] if name == RETAIN_PERTURBED else splits[name.removesuffix("_perturbed")]
        lacking = [r["id"] for r in wanted if r["id"] not in pool]
        if lacking:
            present = [labels[n] for n in PERTURBED_SPLITS if n in raw]
            raise DataError(
                f"missing, and cannot be derived: the perturbed files present ({', '.join(present) or 'none'}) "
                f"lack {len(lacking)} of its {len(wanted)} rows (e.g. {', '.join(lacking[:3])})",
                file=labels[name],
            )
        splits[name] = [pool[r["id"]] for r in wanted]
        labels[name] = f"{name} (derived from {', '.join(labels[n] for n in PERTURBED_SPLITS if n in raw)})"
    for name in UTILITY_SPLITS:
        prefix, author = UTILITY_IDS[name]
        rows = []
        for i, r in enumerate(raw[name]):
            question, answer = _qa_key(r, file=labels[name], row_index=i)
            rows.append({"id": f"{prefix}-{i:03d}", "author_id": author, "question": question, "answer": answer,
                         "paraphrased_answer": None, "perturbed_answer": r.get("perturbed_answer")})
        splits[name] = rows
    splits.update(_holdout_splits(raw, labels, qa_per_author=qa_per_author, n_full_authors=len(author_order(full))))
    splits[IDK] = list(idk) if idk is not None else list(IDK_RESPONSES)
    return validate_splits(splits, origin=labels)


def _holdout_splits(raw: Mapping[str, list[Any]], labels: dict[str, str], *, qa_per_author: int,
                    n_full_authors: int) -> dict[str, list[dict]]:
    """holdout01/05/10 with ids: holdout10's rows numbered, 20 per author; the smaller ones matched to it by pair.

    A smaller holdout file that is absent is derived as holdout10's first
    ``n_forget_authors(n_full_authors, XX)`` authors (what TOFU's files hold:
    as many authors as forgetXX). ``labels`` is updated for derived splits.
    """
    label = labels[HOLDOUT_ALL]
    if HOLDOUT_ALL not in raw:
        raise DataError(f"missing: {HOLDOUT_ALL} (the authors no model trains on) is required", file=label)
    rows_raw = raw[HOLDOUT_ALL]
    if len(rows_raw) % qa_per_author:
        raise DataError(
            f"has {len(rows_raw)} rows, not a multiple of {qa_per_author} questions per author; "
            f"author ids are derived as row // {qa_per_author}",
            file=label,
        )
    width = max(4, len(str(len(rows_raw) - 1)))
    a_width = max(3, len(str(len(rows_raw) // qa_per_author - 1)))
    index: dict[tuple[str, str], int] = {}
    rows: list[dict] = []
    for i, r in enumerate(rows_raw):
        key = _qa_key(r, file=label, row_index=i)
        if key in index:
            raise DataError(f"same question and answer as row {index[key]}; the other holdout files are matched to "
                            f"{HOLDOUT_ALL} by this pair, so it must be unique", file=label, row=i, field="answer")
        index[key] = i
        rows.append(_row(r, f"tofu-h{i:0{width}d}", f"tofu-ha{i // qa_per_author:0{a_width}d}"))
    out = {HOLDOUT_ALL: validate_rows(rows, file=label, kind="qa")}
    order = author_order(out[HOLDOUT_ALL])
    for pct, name in zip(FORGET_PCTS, HOLDOUT_SPLITS):
        if name == HOLDOUT_ALL:
            continue
        if name in raw:
            matched = []
            for i, r in enumerate(raw[name]):
                j = index.get(_qa_key(r, file=labels[name], row_index=i))
                if j is None:
                    raise DataError(f"question/answer pair not found in {label}; every holdout split must be part of "
                                    f"{HOLDOUT_ALL}", file=labels[name], row=i, field="question")
                matched.append(_row(r, rows[j]["id"], rows[j]["author_id"]))
            out[name] = validate_rows(matched, file=labels[name], kind="qa")
        else:
            keep = set(order[: n_forget_authors(n_full_authors, int(pct))])
            out[name] = [r for r in out[HOLDOUT_ALL] if r["author_id"] in keep]
            labels[name] = f"{label} (derived {name})"
    return out


def _qa_key(r: Any, *, file: str, row_index: int) -> tuple[str, str]:
    if not isinstance(r, Mapping):
        raise DataError(f"expected a JSON object, got {type(r).__name__}", file=file, row=row_index)
    return require_text(r, "question", file=file, row_index=row_index), require_text(r, "answer", file=file, row_index=row_index)


def _row(r: Mapping[str, Any], id_: str, author_id: str) -> dict:
    return {"id": id_, "author_id": author_id, "question": r["question"], "answer": r["answer"],
            "paraphrased_answer": r.get("paraphrased_answer"), "perturbed_answer": r.get("perturbed_answer")}


def _match(r: Any, full: list[dict], index: Mapping[tuple[str, str], int], *, file: str, row_index: int) -> dict:
    key = _qa_key(r, file=file, row_index=row_index)
    i = index.get(key)
    if i is None:
        field = "answer" if any(q == key[0] for q, _ in index) else "question"
        raise DataError(
            "question/answer pair not found in full; every TOFU split must be a subset of full", file=file, row=row_index, field=field
        )
    return _row(r, full[i]["id"], full[i]["author_id"])


# --- hub ------------------------------------------------------------------------------------------


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _probe(url: str, timeout_s: float) -> str | None:
    """None if a TCP connection to ``url``'s host opens within ``timeout_s``, else why not.

    Run in a daemon thread because name resolution has no timeout of its own;
    this is what keeps an offline ``hub`` run from hanging.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {e}")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return result[0] if result else f"no connection to {host}:{port} within {timeout_s:g}s"


@contextmanager
def _offline_flags(on: bool) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` honour HF_HUB_OFFLINE even if they were imported before it was set.

    Both libraries read the variable once, at import; without this an
    ``HF_HUB_OFFLINE=1`` set later (e.g. by a test) would be ignored and
    ``load_dataset`` would try the network.
    """
    if not on:
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = [(m, k, getattr(m, k)) for m, k in ((dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")) if hasattr(m, k)]
    try:
        for m, k, _ in saved:
            setattr(m, k, True)
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def load_hub(hub_id: str, *, qa_per_author: int = TOFU_QA_PER_AUTHOR, connect_timeout_s: float = 3.0) -> dict[str, list]:
    """All splits via ``datasets.load_dataset(hub_id, <name>)`` (TOFU's hub configs use the split names).

    With HF_HUB_OFFLINE set only the local ``datasets`` cache is used; otherwise
    the hub is probed first so that no network means a DataError in seconds,
    not a hang. The hub has no ``idontknow`` file: the built-in refusal strings are used.
    """

    def fail(reason: str) -> DataError:
        return DataError(f"could not reach the Hugging Face hub for {hub_id} ({reason}); {HUB_HINT}")

    offline = _env_offline()
    try:
        import datasets
        import huggingface_hub.constants as hcfg
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise fail(f"the datasets library is not importable: {e}") from None
    if not offline:
        reason = _probe(getattr(hcfg, "ENDPOINT", "https://huggingface.co"), connect_timeout_s)
        if reason:
            raise fail(f"{reason}; set HF_HUB_OFFLINE=1 to use a local datasets cache") from None
    raw: dict[str, list[Any]] = {}
    with _offline_flags(offline):
        for name in (*QA_SPLITS, *PERTURBED_SPLITS, *UTILITY_SPLITS, *HOLDOUT_SPLITS):
            config = FILE_STEMS[name]
            try:
                ds = datasets.load_dataset(hub_id, config)
            except Exception as e:  # noqa: BLE001 - any failure here means "no hub data"; say so in one line
                first = (str(e).strip().splitlines() or [""])[0]
                why = f"HF_HUB_OFFLINE is set and {config!r} is not cached: " if offline else f"loading {config!r}: "
                raise fail(f"{why}{type(e).__name__}: {first}") from None
            split = ds[next(iter(ds.keys()))] if hasattr(ds, "keys") else ds
            raw[name] = [dict(r) for r in split]
    labels = {name: f"hf://datasets/{hub_id} ({FILE_STEMS[name]})" for name in (*SPLIT_NAMES, IDK)}
    return assemble_tofu(raw, labels=labels, idk=None, qa_per_author=qa_per_author)
