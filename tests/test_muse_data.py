"""The MUSE-News data layer: generator, loaders, schema, split files and the GX gate (unlearn.data.muse_*).

The generator's invariants are what the MUSE metrics rely on (disjoint folds, holdout
never trained on, every KnowMem answer a span of its article, VerbMem prompt + truth =
a fold1 article); the loaders are tested on a small hand-written MUSE-News layout and,
when present, on the real files in ../shared/data/muse/news. GX imports once per process
(~3 s); each suite run on the synthetic default takes about a second.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest

from unlearn.config import DataCfg, ModelCfg, MuseCfg, MuseSyntheticCfg, Params
from unlearn.data.muse_loaders import LOCAL_FILES, load_muse, load_muse_local
from unlearn.data.muse_synthetic import generate_muse
from unlearn.data.muse_validate import run_muse_validation, validate_muse_splits_gx
from unlearn.data.names import (
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
from unlearn.data.schema import DataError, validate_muse_splits, validate_rows
from unlearn.data.splits import MANIFEST, dumps_rows, forget_set_hash, read_manifest, read_split, read_split_dir, write_splits
from unlearn.data.validate import ValidationFailed, result_path

REAL_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "muse" / "news").resolve()
TEXT_SPLITS = (*MUSE_FOLDS, PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT)


@pytest.fixture(scope="module")
def syn() -> dict[str, list[dict]]:
    return generate_muse(MuseSyntheticCfg())


def _texts(splits, *names) -> list[str]:
    return [r["text"] for n in names for r in splits[n]]


# --- the generator -----------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded(syn):
    again = generate_muse(MuseSyntheticCfg())
    assert all(dumps_rows(syn[n]) == dumps_rows(again[n]) for n in MUSE_SPLIT_NAMES)
    other = generate_muse(MuseSyntheticCfg(seed=1))
    assert _texts(other, "fold1") != _texts(syn, "fold1")
    assert list(syn) == list(MUSE_SPLIT_NAMES)


def test_generator_sizes_and_ids(syn):
    cfg = MuseSyntheticCfg()
    assert [len(syn[f]) for f in MUSE_FOLDS] == [cfg.articles_per_fold] * 4
    assert len(syn[PRIVLEAK_RETAIN]) == cfg.retain_articles and len(syn[PRIVLEAK_HOLDOUT]) == cfg.holdout_articles
    assert len(syn[KNOWMEM_FORGET]) == cfg.articles_per_fold * cfg.qa_per_article
    assert len(syn[KNOWMEM_RETAIN]) == cfg.retain_articles * cfg.qa_per_article
    assert len(syn[KNOWMEM_FORGET_ICL]) == len(syn[KNOWMEM_RETAIN_ICL]) == cfg.icl_examples
    assert syn["fold1"][3]["id"] == "f1-003" and syn["fold4"][0]["id"] == "f4-000"
    assert syn[PRIVLEAK_RETAIN][4]["id"] == "ret-004" and syn[PRIVLEAK_HOLDOUT][2]["id"] == "hold-002"
    assert syn[VERBMEM_FORGET][1]["id"] == "vm-001" and syn[KNOWMEM_FORGET][1]["id"] == "kf-001"
    assert validate_muse_splits(syn) == syn  # already in the normalised schema


def test_generator_disjointness(syn):
    groups = [set(_texts(syn, n)) for n in (*MUSE_FOLDS, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT)]
    assert sum(map(len, groups)) == len(set().union(*groups))  # pairwise disjoint, no repeats
    assert _texts(syn, PRIVLEAK_FORGET) == _texts(syn, "fold1")
    assert [r["id"] for r in syn[PRIVLEAK_FORGET]] == [r["id"] for r in syn["fold1"]]


def _capitalised(question: str) -> list[str]:
    return re.findall(r"\b[A-Z][a-z]+\b", question)[1:]  # the invented names, not the first word


@pytest.mark.parametrize("qa, source", [(KNOWMEM_FORGET, "fold1"), (KNOWMEM_RETAIN, PRIVLEAK_RETAIN),
                                        (KNOWMEM_FORGET_ICL, "fold2"), (KNOWMEM_RETAIN_ICL, "fold3")])
def test_knowmem_answers_are_spans_of_their_article(syn, qa, source):
    for r in syn[qa]:
        assert 1 <= len(r["answer"].split()) <= 5, r
        articles = [t for t in _texts(syn, source) if r["answer"] in t and all(w in t for w in _capitalised(r["question"]))]
        assert len(articles) == 1, r  # the question names its article, and the answer is in it


def test_icl_examples_are_not_eval_questions(syn):
    assert not {r["question"] for r in syn[KNOWMEM_FORGET_ICL]} & {r["question"] for r in syn[KNOWMEM_FORGET]}
    assert not {r["question"] for r in syn[KNOWMEM_RETAIN_ICL]} & {r["question"] for r in syn[KNOWMEM_RETAIN]}


def test_verbmem_is_a_cut_fold1_article(syn):
    fold1 = _texts(syn, "fold1")
    assert len(syn[VERBMEM_FORGET]) == len(fold1)
    for r, article in zip(syn[VERBMEM_FORGET], fold1):
        assert r["prompt"] + r["gt"] == article
        assert r["prompt"].count(". ") == 1 and r["gt"].startswith(" ")  # two sentences, then the rest


def test_article_token_lengths_with_a_2048_bpe(syn):
    """Every article (Q&A box and prose) fits one training chunk of muse/params.yaml's max_length, BOS included."""
    from unlearn.config import load_params
    from unlearn.models.build import train_tokenizer

    tok = train_tokenizer(_texts(syn, *MUSE_FOLDS, PRIVLEAK_RETAIN), 2048)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in _texts(syn, *TEXT_SPLITS)]
    max_length = load_params("muse/params.yaml").model.max_length
    assert 150 <= min(lengths) and max(lengths) < max_length and 170 <= sum(lengths) / len(lengths) <= 240, lengths


def test_generator_small_and_zero_shot_config(tmp_path):
    splits = generate_muse(MuseSyntheticCfg(articles_per_fold=2, retain_articles=2, holdout_articles=2,
                                            sentences_per_article=3, qa_per_article=1, icl_examples=0, seed=5))
    assert splits[KNOWMEM_FORGET_ICL] == [] and len(splits["fold2"]) == 2
    manifest = write_splits(splits, tmp_path / "muse")
    assert read_split_dir(tmp_path / "muse")[KNOWMEM_RETAIN_ICL] == []
    report = validate_muse_splits_gx(splits, forget_split="fold1", manifest=manifest)
    assert report.success and report.checked[KNOWMEM_FORGET_ICL]["rows"] == 0, report.render()
    assert read_split(tmp_path / "muse", KNOWMEM_FORGET_ICL) == []
    with pytest.raises(DataError, match="no rows"):
        validate_rows([], file="x.json", kind="knowmem")


def test_generator_refuses_impossible_configs():
    with pytest.raises(DataError, match="sentences_per_article=40 is too large"):
        generate_muse(MuseSyntheticCfg(sentences_per_article=40))
    with pytest.raises(DataError, match="own invented town"):
        generate_muse(MuseSyntheticCfg(articles_per_fold=500))


# --- local files ----------------------------------------------------------------------------------------------

A = [f"Article {i} of fold one says the value is {i}.\n\nIts second paragraph has more on {i}." for i in range(4)]


def _layout(root: Path, **override) -> Path:
    """A small MUSE-News directory: 4 folds (fold2 repeats one fold1 article, fold1 has an empty one)."""
    files = {
        "sust/forget_1.json": [*A, ""],
        "sust/forget_2.json": ["Fold two first.", A[1], "Fold two third."],
        "sust/forget_3.json": ["Fold three first.", "Fold three second."],
        "sust/forget_4.json": ["Fold four only."],
        "privleak/forget.json": [A[0], "paragraph has more on 1.\n\nArticle 2 of fold one"],  # an article, a chunk
        "privleak/retain.json": ["Retained article."],
        "privleak/holdout.json": ["Held-out article.", "Another held-out one."],
        "verbmem/forget.json": [{"prompt": "Article 3 of fold one", "gt": " says the value is 3."}],
        "knowmem/forget_qa.json": [{"question": "What is the value in article 2?", "answer": "2"}],
        "knowmem/forget_qa_icl.json": [{"question": "What is the value in article 0?", "answer": "0"}],
        "knowmem/retain_qa.json": [{"question": "Which article is retained?", "answer": "Retained article"}],
        "knowmem/retain_qa_icl.json": [],
        "raw/forget.json": [*A, ""],
        **override,
    }
    for rel, value in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            continue
        path.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    return root


def test_local_layout_loads(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="unlearn"):
        d = load_muse(DataCfg(source="local", local_dir=str(_layout(tmp_path))), MuseSyntheticCfg())
    assert list(d) == list(MUSE_SPLIT_NAMES)
    assert [r["id"] for r in d["fold1"]] == ["fold1-0000", "fold1-0001", "fold1-0002", "fold1-0003"]  # empty dropped
    assert [r["id"] for r in d["fold2"]] == ["fold2-0000", "fold2-0002"]  # A[1] stays in fold1 only
    assert "fold2" in caplog.text and "1 repeated" in caplog.text and "1 empty" in caplog.text
    assert d[PRIVLEAK_FORGET][1] == {"id": "pf-0001", "text": "paragraph has more on 1.\n\nArticle 2 of fold one"}
    assert d[VERBMEM_FORGET] == [{"id": "vm-0000", "prompt": "Article 3 of fold one", "gt": " says the value is 3."}]
    assert d[KNOWMEM_RETAIN][0] == {"id": "kr-0000", "question": "Which article is retained?", "answer": "Retained article"}
    assert d[KNOWMEM_RETAIN_ICL] == []


def test_local_missing_file_names_it_and_the_layout(tmp_path):
    root = _layout(tmp_path)
    (root / "knowmem" / "retain_qa.json").unlink()
    with pytest.raises(DataError) as info:
        load_muse_local(root)
    msg = str(info.value)
    assert "missing file(s) knowmem/retain_qa.json" in msg and "sust/forget_1.json" in msg and "privleak/holdout.json" in msg
    with pytest.raises(DataError, match=r"MUSE-News directory not found \(resolved: .*nowhere\); expected a directory holding sust/forget_1.json"):
        load_muse_local(tmp_path / "nowhere")


def test_local_row_missing_a_field(tmp_path):
    root = _layout(tmp_path, **{"knowmem/forget_qa.json": [{"question": "q?", "answer": "a"}, {"question": "no answer?"}]})
    with pytest.raises(DataError) as info:
        load_muse_local(root)
    e = info.value
    assert (Path(e.file).name, e.row, e.field) == ("forget_qa.json", 1, "answer")
    assert str(e).startswith(str(root / "knowmem" / "forget_qa.json") + ", row 1, field 'answer': missing required field")


def test_local_non_string_article(tmp_path):
    root = _layout(tmp_path, **{"sust/forget_3.json": ["fine", 42]})
    with pytest.raises(DataError) as info:
        load_muse_local(root)
    assert (Path(info.value.file).name, info.value.row) == ("forget_3.json", 1)
    assert "expected an article (a JSON string, or an object with 'text'), got int" in str(info.value)
    root = _layout(tmp_path, **{"sust/forget_3.json": [{"text": None}]})
    with pytest.raises(DataError, match=r"forget_3.json, row 0, field 'text': expected the article as a string, got null"):
        load_muse_local(root)


def test_local_bad_json_and_inconsistent_files(tmp_path):
    root = _layout(tmp_path, **{"verbmem/forget.json": '[{"prompt": "a", "gt": "b"},\n {"prompt": oops}]'})
    with pytest.raises(DataError, match=r"verbmem/forget.json, line 2, row 1: malformed JSON"):
        load_muse_local(root)
    root = _layout(tmp_path / "b", **{"privleak/forget.json": ["not from fold1"]})
    with pytest.raises(DataError, match=r"privleak/forget.json, row 0, field 'text': not a passage of .*forget_1.json"):
        load_muse_local(root)
    root = _layout(tmp_path / "c", **{"raw/forget.json": ["something else"]})
    with pytest.raises(DataError, match=r"raw/forget.json: differs from .*sust/forget_1.json"):
        load_muse_local(root)
    root = _layout(tmp_path / "d", **{"privleak/holdout.json": ["Fold four only."]})
    with pytest.raises(DataError, match=r"holdout.json, row 0, field 'text': same text as .*forget_4.json row 0 .*no model trains on"):
        load_muse_local(root)


def test_real_muse_news_files():
    if not (REAL_DIR / LOCAL_FILES["fold1"]).is_file():
        pytest.skip(f"real MUSE-News files not found at {REAL_DIR} (see ../shared/data/SOURCES.md)")
    d = load_muse_local(REAL_DIR)
    assert [len(d[f]) for f in MUSE_FOLDS] == [857, 795, 757, 710]  # 889/889/889/887 before the repeats are dropped
    assert all(len(d[n]) == 100 for n in (PRIVLEAK_FORGET, PRIVLEAK_RETAIN, PRIVLEAK_HOLDOUT, VERBMEM_FORGET,
                                          KNOWMEM_FORGET, KNOWMEM_RETAIN))
    assert len(d[KNOWMEM_FORGET_ICL]) == len(d[KNOWMEM_RETAIN_ICL]) == 10
    fold1 = set(_texts(d, "fold1"))
    assert not fold1 & set(_texts(d, PRIVLEAK_FORGET))  # chunks, not articles...
    raw = "\n\n".join(json.loads((REAL_DIR / "raw" / "forget.json").read_text(encoding="utf-8")))
    assert all(t in raw for t in _texts(d, PRIVLEAK_FORGET))  # ...of raw/forget.txt
    folds = set(_texts(d, *MUSE_FOLDS))
    assert not folds & set(_texts(d, PRIVLEAK_RETAIN)) and not folds & set(_texts(d, PRIVLEAK_HOLDOUT))


# --- split files ---------------------------------------------------------------------------------------------


def test_write_read_round_trip(syn, tmp_path):
    out = tmp_path / "muse"
    manifest = write_splits(syn, out)
    assert set(manifest) == set(MUSE_SPLIT_NAMES) and read_manifest(out) == manifest
    assert "authors" not in manifest["fold1"] and manifest["fold1"]["rows"] == 12
    assert manifest["fold2"]["forget_set_hash"] == forget_set_hash(syn["fold2"])
    assert "forget_set_hash" not in manifest[PRIVLEAK_FORGET]
    assert read_split_dir(out) == syn
    assert read_split_dir(out, ["fold3", PRIVLEAK_RETAIN]) == {"fold3": syn["fold3"], PRIVLEAK_RETAIN: syn[PRIVLEAK_RETAIN]}
    assert read_split(out, VERBMEM_FORGET) == syn[VERBMEM_FORGET]
    first = (out / "fold1.json").read_bytes()
    write_splits(generate_muse(MuseSyntheticCfg()), out)
    assert (out / "fold1.json").read_bytes() == first  # byte-deterministic


def test_nothing_written_when_validation_fails(syn, tmp_path):
    bad = copy.deepcopy(syn)
    bad["fold3"][2]["text"] = bad["fold1"][5]["text"]
    out = tmp_path / "muse"
    with pytest.raises(DataError, match=r"fold3, row 2, field 'text': same text as fold1 row 5 \(id 'f1-005'\); the folds must be pairwise disjoint"):
        write_splits(bad, out)
    assert not out.exists() and not list(tmp_path.iterdir())
    write_splits(syn, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    del bad["fold3"]
    bad["fold1"][0] = {"id": "f1-000", "text": 7}
    with pytest.raises(DataError, match="missing MUSE split"):
        write_splits(bad, out)
    with pytest.raises(DataError, match=r"unknown MUSE split\(s\) 'full'"):
        write_splits({**syn, "full": []}, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_schema_rules(syn):
    bad = copy.deepcopy(syn)
    bad[PRIVLEAK_RETAIN][1]["text"] = bad["fold4"][0]["text"]
    with pytest.raises(DataError, match=r"privleak_retain, row 1, field 'text': same text as fold4 row 0"):
        validate_muse_splits(bad)
    bad = copy.deepcopy(syn)
    bad[PRIVLEAK_FORGET][0]["text"] = bad["fold2"][0]["text"]
    with pytest.raises(DataError, match=r"privleak_forget, row 0, field 'text': neither an article of fold1"):
        validate_muse_splits(bad)
    bad = copy.deepcopy(syn)
    bad[VERBMEM_FORGET][0]["prompt"] = ["not", "text"]
    with pytest.raises(DataError, match=r"verbmem_forget, row 0, field 'prompt': expected a non-empty string, got list"):
        validate_muse_splits(bad)
    bad = copy.deepcopy(syn)
    bad["fold2"][1]["id"] = bad["fold2"][0]["id"]
    with pytest.raises(DataError, match=r"fold2, row 1, field 'id': duplicate id 'f2-000'"):
        validate_muse_splits(bad)


# --- the GX gate ---------------------------------------------------------------------------------------------


def _params(tmp_path: Path, out_dir: Path, **model) -> Params:
    return Params(benchmark="muse", reports_dir=str(tmp_path / "reports"),
                  data=DataCfg(out_dir=str(out_dir), forget_split="fold1"),
                  model=ModelCfg(out_dir=str(tmp_path / "models"), **model), muse=MuseCfg())


def test_gate_passes_on_the_synthetic_default(syn, tmp_path):
    from unlearn.models.build import train_tokenizer

    out = tmp_path / "muse"
    write_splits(syn, out)
    p = _params(tmp_path, out, max_length=160)
    tok = train_tokenizer(_texts(syn, *MUSE_FOLDS, PRIVLEAK_RETAIN), 2048)
    report = run_muse_validation(p, tokenizer=tok, tokenizer_source="test BPE")
    assert report.success, report.render()
    assert list(report.checked) == list(MUSE_SPLIT_NAMES)
    saved = json.loads(result_path(p).read_text())
    assert saved["success"] and saved["n_failures"] == 0 and saved["forget_split"] == "fold1"
    t = saved["truncation"]
    assert t["computed"] and t["max_length"] == 160 and t["splits"]["fold1"]["over"] > 0  # ~170-token articles
    assert t["splits"][VERBMEM_FORGET]["over"] == 12  # ~50-token prompts + 128 new tokens
    assert t["suggested_max_length"] > 160 and "privleak_forget" in t["warning"]
    assert "token lengths at model.max_length=160" in report.render()
    bare = run_muse_validation(p)  # no tokenizer: the counts are unknown, and said so
    assert bare.success and bare.truncation["computed"] is False


def test_gate_fails_readably_on_a_bad_split(syn, tmp_path):
    out = tmp_path / "muse"
    write_splits(syn, out)
    bad = copy.deepcopy(syn[PRIVLEAK_HOLDOUT])
    bad[3]["text"] = syn["fold2"][7]["text"]  # a holdout article that is also trained on
    bad[5]["text"] = "   "
    data = dumps_rows(bad)
    (out / "privleak_holdout.json").write_bytes(data)
    manifest = json.loads((out / MANIFEST).read_text())
    import hashlib

    manifest[PRIVLEAK_HOLDOUT]["sha256"] = hashlib.sha256(data).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "knowmem_forget_qa.json").write_text("[]\n")  # changed after writing: sha256 and row count
    p = _params(tmp_path, out)
    report = run_muse_validation(p)
    assert not report.success
    text = report.render()
    by = {(f["split"], f["expectation"], f["column"]): f for f in report.failures}
    leak = by[(PRIVLEAK_HOLDOUT, "expect_column_values_to_not_be_in_set", "text_sha1")]
    assert leak["rows"] == ["hold-003"] and "fold2" in leak["message"] and "never trained on" in leak["message"]
    empty = by[(PRIVLEAK_HOLDOUT, "expect_column_values_to_be_between", "text_len_stripped")]
    assert empty["rows"] == ["hold-005"] and empty["count"] == 1
    assert (KNOWMEM_FORGET, "file_matches_manifest_sha256", None) in by
    assert "FAILED" in text and "[privleak_holdout]" in text and "hold-003" in text and "knowmem_forget_qa.json" in text
    assert json.loads(result_path(p).read_text())["success"] is False  # written on failure too
    with pytest.raises(ValidationFailed, match="privleak_holdout"):
        raise ValidationFailed(report)


def test_gate_in_memory_failures(syn):
    bad = copy.deepcopy(syn)
    bad["fold2"][0]["text"] = syn["fold1"][0]["text"]
    bad[KNOWMEM_RETAIN][1]["answer"] = None
    del bad["fold4"]
    report = validate_muse_splits_gx(bad, forget_split="fold1", manifest=None)
    got = {(f["split"], f["expectation"], f["column"]): f["rows"] for f in report.failures}
    assert got == {
        ("fold2", "expect_column_values_to_not_be_in_set", "text_sha1"): ["f2-000"],
        ("fold4", "split_exists", None): [],
        (KNOWMEM_RETAIN, "expect_column_values_to_not_be_null", "answer"): ["kr-001"],
    }, report.render()


# --- the hub ----------------------------------------------------------------------------------------------------


def test_hub_offline_fails_fast_naming_the_local_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        load_muse(DataCfg(source="hub", hub_id="muse-bench/MUSE-News"), MuseSyntheticCfg())
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert msg.startswith("could not load muse-bench/MUSE-News from the Hugging Face hub (")
    assert "data.source=local with data.local_dir=../shared/data/muse/news" in msg


def test_hub_unreachable_without_offline_flag(monkeypatch):
    """No HF_HUB_OFFLINE and no network: the connection probe answers in seconds, no hang."""
    import huggingface_hub.constants as hcfg

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hcfg, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"could not load muse-bench/MUSE-News .*127\.0\.0\.1:9.*data\.local_dir=../shared/data/muse/news"):
        load_muse(DataCfg(source="hub", hub_id="muse-bench/MUSE-News"), MuseSyntheticCfg())
    assert time.monotonic() - t0 < 10


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source 'ftp'"):
        load_muse(DataCfg.model_construct(source="ftp"), MuseSyntheticCfg())
