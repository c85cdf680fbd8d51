"""The Great Expectations data gate (unlearn.data.validate): clean data passes, each kind of bad split is named.

write_splits / read_split refuse most bad rows themselves, so bad splits are built
in memory and handed to validate_splits_gx directly (the GX suite is an
independent second line); the on-disk path is tested by writing JSON files
directly, bypassing write_splits. GX imports once per process (~3 s); each suite
run on the 10-author synthetic data takes well under a second.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml

from unlearn.config import DataCfg, ModelCfg, Params
from unlearn.data.splits import dumps_rows, write_splits
from unlearn.data.synthetic import generate_tofu
from unlearn.data.validate import ValidationFailed, ValidationReport, gate_splits, run_validation, validate_splits_gx

FORGET = "forget10"
RETAIN = "retain90"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(splits, manifest, out_dir): the 10-author synthetic dataset, written once."""
    out = tmp_path_factory.mktemp("tofu") / "splits"
    splits = generate_tofu(n_authors=10)
    manifest = write_splits(splits, out)
    return splits, manifest, out


def _run(splits, manifest, **kw) -> ValidationReport:
    return validate_splits_gx(splits, forget_split=FORGET, manifest=manifest, **kw)


def _only(report: ValidationReport, split: str, expectation: str, column: str | None = None) -> dict:
    hits = [f for f in report.failures if f["split"] == split and f["expectation"] == expectation and f["column"] == column]
    assert len(hits) == 1, report.render()
    return hits[0]


def _params(tmp_path: Path, out_dir: Path, **model) -> Params:
    """Everything under ``tmp_path`` (model.out_dir too: no tokenizer of the repository's own models/ is read)."""
    return Params(reports_dir=str(tmp_path / "reports"), data=DataCfg(out_dir=str(out_dir), forget_split=FORGET),
                  model=ModelCfg(out_dir=str(tmp_path / "models"), **model))


def test_clean_splits_pass(clean):
    splits, manifest, _ = clean
    report = _run(splits, manifest)
    assert report.success, report.render()
    assert report.failures == []
    assert list(report.checked) == gate_splits(FORGET)
    assert report.checked["full"]["rows"] == 200
    assert "passed" in report.render()
    json.dumps(report.to_dict())  # JSON-safe


@pytest.mark.parametrize("how", ["null", "missing"])
def test_null_or_missing_answer(clean, how):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    row = bad[FORGET][3]
    if how == "null":
        row["answer"] = None
    else:
        del row["answer"]
    report = _run(bad, manifest)
    assert not report.success
    f = _only(report, FORGET, "expect_column_values_to_not_be_null", "answer")
    assert f["rows"] == [row["id"]] and f["count"] == 1
    text = report.render()
    assert "expect_column_values_to_not_be_null" in text and FORGET in text and row["id"] in text


def test_duplicated_id(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    dup = bad[RETAIN][4]["id"]
    bad[RETAIN][5]["id"] = dup
    report = _run(bad, manifest)
    f = _only(report, RETAIN, "expect_column_values_to_be_unique", "id")
    assert f["count"] == 2 and f["rows"] == [dup, dup]
    assert dup in report.render()


def test_retain_row_of_a_forget_author(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    row = bad[RETAIN][3]
    row["author_id"] = bad[FORGET][0]["author_id"]
    report = _run(bad, manifest)
    f = _only(report, RETAIN, "expect_column_values_to_not_be_in_set", "author_id")
    assert f["rows"] == [row["id"]] and f["count"] == 1
    assert "disjoint" in f["message"]
    assert row["id"] in report.render()


def test_retain_row_duplicating_a_forget_id(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    forget_id = bad[FORGET][0]["id"]
    bad[RETAIN][4]["id"] = forget_id
    report = _run(bad, manifest)
    f = _only(report, RETAIN, "expect_column_values_to_not_be_in_set", "id")
    assert f["rows"] == [forget_id]
    assert forget_id in report.render()


def test_split_size_differs_from_manifest(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    del bad["world_facts"][0]
    report = _run(bad, manifest)
    f = _only(report, "world_facts", "expect_table_row_count_to_equal")
    assert f["observed"] == manifest["world_facts"]["rows"] - 1
    assert f["expected"] == {"value": manifest["world_facts"]["rows"]}
    assert "expect_table_row_count_to_equal" in report.render()


def test_forget_split_not_the_expected_fraction_of_authors(clean):
    splits, _, _ = clean
    bad = copy.deepcopy(splits)
    bad[FORGET].append(copy.deepcopy(bad[RETAIN][0]))  # a second author in forget10 of 10 authors
    report = _run(bad, None)  # no manifest: the fraction rule alone must catch it
    f = _only(report, FORGET, "expect_column_unique_value_count_to_be_between", "author_id")
    assert f["observed"] == 2 and f["expected"] == {"min_value": 1, "max_value": 1}
    assert "n_forget_authors(10, 10)" in f["message"]


def test_perturbed_row_with_four_answers(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    row = bad[f"{FORGET}_perturbed"][2]
    row["perturbed_answer"] = row["perturbed_answer"][:4]
    report = _run(bad, manifest)
    f = _only(report, f"{FORGET}_perturbed", "expect_column_values_to_be_between", "n_perturbed")
    assert f["rows"] == [row["id"]] and f["expected"] == {"min_value": 5, "max_value": 5}


def test_whitespace_only_question(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    row = bad["full"][5]
    row["question"] = "  \t "
    report = _run(bad, manifest)
    f = _only(report, "full", "expect_column_values_to_be_between", "question_len_stripped")
    assert f["rows"] == [row["id"]]
    assert "question_len_stripped" in report.render() and row["id"] in report.render()


def test_over_long_answer_and_bound_override(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    row = bad["real_authors"][1]
    row["answer"] = "x" * 2001
    report = _run(bad, manifest)
    f = _only(report, "real_authors", "expect_column_values_to_be_between", "answer_len")
    assert f["rows"] == [row["id"]] and f["expected"] == {"min_value": 1, "max_value": 2000}
    # the bound is a keyword override: a tight one flags the normal answers too
    tight = _run(splits, manifest, max_answer_chars=5)
    g = _only(tight, "full", "expect_column_values_to_be_between", "answer_len")
    assert g["count"] == 200 and len(g["rows"]) == 20
    assert "(first 20)" in tight.render()


def _write_raw(out: Path, name: str, rows: list, manifest: dict) -> None:
    """Write a split file directly (bypassing write_splits' checks) and keep the manifest in step with it."""
    data = dumps_rows(rows)
    (out / f"{name}.json").write_bytes(data)
    manifest[name]["rows"] = len(rows)
    manifest[name]["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def bad_on_disk(clean, tmp_path):
    """A copy of the written splits whose retain90.json holds a duplicated id (manifest adjusted to match)."""
    splits, manifest, _ = clean
    out = tmp_path / "splits"
    write_splits(splits, out)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = copy.deepcopy(splits[RETAIN])
    rows.append(copy.deepcopy(rows[7]))
    _write_raw(out, RETAIN, rows, manifest)
    return out, rows[7]["id"]


def test_run_validation_on_bad_file(bad_on_disk, tmp_path):
    out, dup = bad_on_disk
    p = _params(tmp_path, out)
    report = run_validation(p)
    assert not report.success
    f = _only(report, RETAIN, "expect_column_values_to_be_unique", "id")
    assert f["rows"] == [dup, dup]
    saved = json.loads((tmp_path / "reports" / "validation" / "result.json").read_text())
    assert saved["success"] is False and saved == report.to_dict()


def test_run_validation_file_changed_after_writing(clean, tmp_path):
    splits, _, _ = clean
    out = tmp_path / "splits"
    write_splits(splits, out)
    (out / "world_facts.json").write_bytes(dumps_rows(splits["world_facts"][:-1]))  # manifest not updated
    report = run_validation(_params(tmp_path, out))
    f = _only(report, "world_facts", "file_matches_manifest_sha256")
    assert "world_facts.json" in f["message"]


def test_stage_passes_then_raises_and_writes_result(clean, bad_on_disk, tmp_path):
    from unlearn import stages

    _, _, good_out = clean
    ok = stages.validate(_params(tmp_path / "good", good_out))
    assert ok["success"] is True and ok["n_failures"] == 0
    assert json.loads((tmp_path / "good" / "reports" / "validation" / "result.json").read_text())["success"] is True

    out, dup = bad_on_disk
    p = _params(tmp_path, out)
    with pytest.raises(ValidationFailed) as exc:
        stages.validate(p)
    assert isinstance(exc.value, ValueError)
    assert str(exc.value) == exc.value.report.render()
    assert "expect_column_values_to_be_unique" in str(exc.value) and dup in str(exc.value)
    assert json.loads((tmp_path / "reports" / "validation" / "result.json").read_text())["success"] is False


def test_cli_exit_code_and_report(bad_on_disk, tmp_path):
    from typer.testing import CliRunner

    from unlearn.cli import app

    out, dup = bad_on_disk
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"reports_dir": str(tmp_path / "reports"), "data": {"out_dir": str(out), "forget_split": FORGET}}))
    result = CliRunner().invoke(app, ["validate", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "FAILED" in result.output and "expect_column_values_to_be_unique" in result.output and dup in result.output
    assert (tmp_path / "reports" / "validation" / "result.json").is_file()


# --------------------------------------------------------------------------- truncation section
@pytest.fixture(scope="module")
def small_tok(clean):
    """A 300-token BPE trained on the synthetic corpus, as the tokenizer stage trains one."""
    from unlearn.models.build import train_tokenizer
    from unlearn.benchmark import get_benchmark

    corpus_texts = get_benchmark("tofu").corpus_texts

    splits, _, _ = clean
    return train_tokenizer(corpus_texts({k: v for k, v in splits.items() if k != "idk"}), 300)


def _cut_by_encode_qa(tok, rows, field, max_length):
    """(rows, cut rows) of ``field``, counted one encode_qa call at a time (not through the batched counter)."""
    from unlearn.models.formatting import encode_qa

    pairs = [(r["question"], t) for r in rows
             for t in (r.get(field) or [] if field == "perturbed_answer" else [r.get(field)]) if t]
    return len(pairs), sum(encode_qa(tok, q, t, max_length).truncated for q, t in pairs)


def test_validation_result_carries_truncation(clean, small_tok, tmp_path, caplog):
    from unlearn.models.formatting import qa_lengths

    splits, _, out = clean
    answers = splits["full"]
    lengths = sorted(qa_lengths(small_tok, [r["question"] for r in answers], [r["answer"] for r in answers]))
    max_length = lengths[len(lengths) // 2]  # about half the answers are cut
    p = _params(tmp_path, out, max_length=max_length)
    with caplog.at_level(logging.WARNING, logger="unlearn"):
        report = run_validation(p, tokenizer=small_tok, tokenizer_source="the test tokenizer")
    assert report.success, report.render()  # a warning, not a gate failure
    t = report.truncation
    assert t["computed"] is True and t["max_length"] == max_length and t["tokenizer"] == "the test tokenizer"
    assert list(t["splits"]) == gate_splits(FORGET)
    assert set(t["splits"][f"{FORGET}_perturbed"]) == {"answer", "paraphrased_answer", "perturbed_answer"}
    assert set(t["splits"]["real_authors"]) == {"answer", "perturbed_answer"}
    assert set(t["splits"]["full"]) == {"answer"}
    for name, per in t["splits"].items():
        for field, c in per.items():
            n, k = _cut_by_encode_qa(small_tok, splits[name], field, max_length)
            assert (c["rows"], c["truncated"]) == (n, k), (name, field)
            assert c["percent"] == round(100 * k / n, 2)
    assert t["splits"]["full"]["answer"]["truncated"] > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    full = t["splits"]["full"]["answer"]
    assert f"full answer {full['percent']:.2f} % ({full['truncated']}/{full['rows']})" in warned[0]
    assert f"model.max_length={t['suggested_max_length']} would cut under 1 %" in warned[0]
    assert t["truncated"] == sum(c["truncated"] for per in t["splits"].values() for c in per.values())
    # The suggested length cuts under 1 % of every split and field; one token less does not.
    s = t["suggested_max_length"]
    fine = run_validation(_params(tmp_path / "s", out, max_length=s), tokenizer=small_tok).truncation
    assert all(c["truncated"] < 0.01 * c["rows"] for per in fine["splits"].values() for c in per.values())
    tight = run_validation(_params(tmp_path / "t", out, max_length=s - 1), tokenizer=small_tok).truncation
    assert any(c["truncated"] >= 0.01 * c["rows"] for per in tight["splits"].values() for c in per.values())
    # Written to result.json, rendered in the readable report, and warned about with the splits and the fix.
    saved = json.loads((tmp_path / "reports" / "validation" / "result.json").read_text())
    assert saved["truncation"] == t and saved == report.to_dict()
    text = report.render()
    assert f"truncation at model.max_length={max_length}" in text and f"model.max_length={s}" in text


def test_truncation_without_cut_rows_is_not_a_warning(clean, small_tok, tmp_path, caplog):
    _, _, out = clean
    with caplog.at_level(logging.WARNING, logger="unlearn"):
        report = run_validation(_params(tmp_path, out, max_length=4096), tokenizer=small_tok)
    assert report.truncation["truncated"] == 0 and report.truncation["rows"] > 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "0 of" in report.render() and "WARNING" not in report.render()


def test_stage_counts_truncation_with_the_model_tokenizer(clean, small_tok, tmp_path, caplog):
    """stages.validate: the tokenizer stage's output (or model.path's); without one, the counts are 'not counted'."""
    from unlearn import stages

    _, _, out = clean
    p = _params(tmp_path, out, max_length=8)
    with caplog.at_level(logging.WARNING, logger="unlearn"):
        res = stages.validate(p)
    assert res["success"] is True
    assert res["truncation"]["computed"] is False and "unlearn tokenizer" in res["truncation"]["reason"]
    assert any("truncation not counted" in r.getMessage() for r in caplog.records)

    small_tok.save_pretrained(stages.tokenizer_dir(p))
    res = stages.validate(p)
    assert res["truncation"]["tokenizer"] == str(stages.tokenizer_dir(p))
    assert res["truncation"]["max_length"] == 8 and res["truncation"]["truncated"] == res["truncation"]["rows"]

    ckpt = tmp_path / "checkpoint"
    small_tok.save_pretrained(ckpt)
    res = stages.validate(_params(tmp_path / "ckpt", out, max_length=4096, path=str(ckpt)))
    assert res["truncation"]["tokenizer"] == str(ckpt) and res["truncation"]["truncated"] == 0


# --------------------------------------------------------------------------- the holdout split

HOLDOUT = "holdout10"


def test_gate_checks_the_holdout_split_of_the_forget_split():
    assert gate_splits("forget10")[-1] == "holdout10" and gate_splits("forget01")[-1] == "holdout01"
    assert "holdout" not in " ".join(gate_splits("forget05")[:-1])


def test_holdout_row_of_a_full_author_or_question(clean):
    splits, manifest, _ = clean
    bad = copy.deepcopy(splits)
    author_row, question_row = bad[HOLDOUT][2], bad[HOLDOUT][5]
    author_row["author_id"] = bad["full"][0]["author_id"]
    question_row["question"] = bad["full"][7]["question"]
    report = _run(bad, None)
    a = _only(report, HOLDOUT, "expect_column_values_to_not_be_in_set", "author_id")
    q = _only(report, HOLDOUT, "expect_column_values_to_not_be_in_set", "question")
    assert a["rows"] == [author_row["id"]] and q["rows"] == [question_row["id"]]
    assert "never trained on" in a["message"] and "of full" in q["message"]
    assert not [f for f in report.failures if f["split"] != HOLDOUT], report.render()
    assert HOLDOUT in report.render() and question_row["id"] in report.render()


def test_holdout_split_with_more_authors_than_the_forget_split(clean):
    splits, _, _ = clean
    bad = copy.deepcopy(splits)
    extra = copy.deepcopy(bad[HOLDOUT][0])
    extra.update(id="syn-h001-q00", author_id="syn-h001")
    bad[HOLDOUT].append(extra)
    report = _run(bad, None)
    f = _only(report, HOLDOUT, "expect_column_unique_value_count_to_be_between", "author_id")
    assert f["observed"] == 2 and f["expected"] == {"min_value": 1, "max_value": 1}
    assert "as many as forget10" in f["message"]


def test_missing_holdout_file_fails_the_gate(clean, tmp_path):
    splits, _, _ = clean
    out = tmp_path / "splits"
    write_splits(splits, out)
    (out / f"{HOLDOUT}.json").unlink()
    report = run_validation(_params(tmp_path, out))
    assert not report.success
    f = _only(report, HOLDOUT, "split_exists")
    assert f"{HOLDOUT}.json" in f["message"]
