"""Data layer: synthetic generator, TOFU loaders, split rules, split files, and the errors bad input gives."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import pytest

from unlearn.config import DataCfg
from unlearn.data import (
    IDK,
    ROW_KEYS,
    SPLIT_NAMES,
    DataError,
    check_disjoint,
    generate_tofu,
    load_from_config,
    load_tofu,
    n_forget_authors,
    read_idk,
    read_split,
    read_split_dir,
    validate_rows,
    write_splits,
)
from unlearn.data import splits as splits_mod
from unlearn.data.splits import author_order

FIXTURE = Path(__file__).parent / "fixtures" / "tofu_small"
FIXTURE_QA = 4  # the fixture has 5 authors x 4 questions


def load_fixture(directory: Path = FIXTURE) -> dict:
    return load_tofu("local", local_dir=directory, hub_id="locuslab/TOFU", n_authors=0, qa_per_author=FIXTURE_QA, seed=0)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def syn40() -> dict:
    return generate_tofu(40, 20, 0)


@pytest.fixture
def written(tmp_path: Path, syn40: dict) -> Path:
    """An out_dir holding a previous, good write: failures must leave it exactly as it is."""
    out = tmp_path / "out"
    write_splits(syn40, out)
    return out


def assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert snapshot(out) == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temp dirs left behind: {leftovers}"


def assert_located(err: DataError, file_part: str, row: int | None, field: str | None) -> None:
    msg = str(err)
    assert file_part in (err.file or "") and file_part in msg, msg
    if row is not None:
        assert err.row == row and f"row {row}" in msg, msg
    if field is not None:
        assert err.field == field and f"field '{field}'" in msg, msg


# --- generator ------------------------------------------------------------------------------------


def test_default_size_and_schema(syn40: dict) -> None:
    assert set(syn40) == {*SPLIT_NAMES, IDK}
    assert len(syn40["full"]) == 800
    assert len(author_order(syn40["full"])) == 40
    for name in SPLIT_NAMES:
        for r in syn40[name]:
            assert tuple(sorted(r)) == tuple(sorted(ROW_KEYS))
    ids = [r["id"] for r in syn40["full"]]
    assert len(set(ids)) == len(ids)
    assert ids[:2] == ["syn-a000-q00", "syn-a000-q01"] and syn40["full"][0]["author_id"] == "syn-a000"


def test_author_names_unique_and_answers_short(syn40: dict) -> None:
    names = [r["answer"].removeprefix("The author's full name is ").rstrip(".") for r in syn40["full"] if r["id"].endswith("-q00")]
    assert len(names) == 40 and len(set(names)) == 40
    for r in syn40["full"]:
        assert 5 <= len(r["answer"].split()) <= 20, r["answer"]
        assert r["paraphrased_answer"] != r["answer"]


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_splits(generate_tofu(12, 20, seed=7), a)
    write_splits(generate_tofu(12, 20, seed=7), b)
    write_splits(generate_tofu(12, 20, seed=8), c)
    files_a = snapshot(a)
    assert set(files_a) == {f"{n}.json" for n in (*SPLIT_NAMES, IDK)} | {"manifest.json"}
    assert files_a == snapshot(b)
    assert files_a["full.json"] != (c / "full.json").read_bytes()


@pytest.mark.parametrize("n_authors, sizes", [(100, (1, 5, 10)), (40, (1, 2, 4)), (3, (1, 1, 1))])
def test_split_invariants(n_authors: int, sizes: tuple[int, int, int]) -> None:
    d = generate_tofu(n_authors, 20, seed=1)
    authors = author_order(d["full"])
    full_ids = [r["id"] for r in d["full"]]
    for pct, k in zip(("01", "05", "10"), sizes):
        forget, retain = d[f"forget{pct}"], d[f"retain{100 - int(pct)}"]
        assert author_order(forget) == authors[-k:], "forget = the LAST authors"
        assert len(forget) == 20 * k
        assert not {r["author_id"] for r in forget} & {r["author_id"] for r in retain}
        assert not {r["id"] for r in forget} & {r["id"] for r in retain}
        assert sorted(r["id"] for r in forget + retain) == sorted(full_ids)
        assert [r["id"] for r in d[f"forget{pct}_perturbed"]] == [r["id"] for r in forget]
    assert author_order(d["retain_perturbed"]) == authors[: sizes[2]], "retain_perturbed = the FIRST authors"
    for name in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed"):
        for r in d[name]:
            assert len(r["perturbed_answer"]) == 5
            assert len(set(r["perturbed_answer"])) == 5
            assert r["answer"] not in r["perturbed_answer"] and r["paraphrased_answer"] not in r["perturbed_answer"]


def test_utility_sets_and_idk(syn40: dict) -> None:
    wf, ra = syn40["world_facts"], syn40["real_authors"]
    assert 35 <= len(wf) <= 45 and 25 <= len(ra) <= 35
    assert wf[0]["id"] == "wf-000" and ra[0]["id"] == "ra-000"
    assert {r["author_id"] for r in wf} == {"world"} and {r["author_id"] for r in ra} == {"real"}
    assert {"question": "What is the capital of France?", "answer": "Paris"}.items() <= wf[0].items()
    for r in wf + ra:
        assert r["paraphrased_answer"] is None
        assert len(r["perturbed_answer"]) == 3 and len(set(r["perturbed_answer"])) == 3
        assert r["answer"] not in r["perturbed_answer"]
    assert 25 <= len(syn40[IDK]) <= 40 and all(isinstance(s, str) and s for s in syn40[IDK])


@pytest.mark.parametrize(
    "n, pct, k", [(200, 1, 2), (200, 5, 10), (200, 10, 20), (100, 1, 1), (40, 1, 1), (40, 5, 2), (40, 10, 4), (30, 5, 2), (10, 5, 1), (150, 1, 2), (3, 10, 1)]
)
def test_n_forget_authors_rounds_half_up(n: int, pct: int, k: int) -> None:
    assert n_forget_authors(n, pct) == k


# --- loaders ----------------------------------------------------------------------------------------


def test_fixture_loads_like_synthetic(syn40: dict, tmp_path: Path) -> None:
    d = load_fixture()
    assert set(d) == set(syn40)
    for name in SPLIT_NAMES:
        for r in d[name]:
            assert set(r) == set(ROW_KEYS)
            assert all(isinstance(r[k], str) for k in ("id", "author_id", "question", "answer"))
            assert r["paraphrased_answer"] is None or isinstance(r["paraphrased_answer"], str)
            assert r["perturbed_answer"] is None or all(isinstance(x, str) for x in r["perturbed_answer"])
    assert len(d["full"]) == 20 and len(author_order(d["full"])) == 5
    assert [r["id"] for r in d["forget10"]] == [f"tofu-{i:04d}" for i in range(16, 20)]
    assert d["forget01"] == d["forget10"] and len(d["retain90"]) == 16  # derived: 5 authors -> 1 forget author
    # "What is the full name of the author?" is in full twice: the answer decides which row it is.
    assert d["retain_perturbed"][0]["id"] == "tofu-0000" and d["forget10_perturbed"][0]["id"] == "tofu-0016"
    assert [len(r["perturbed_answer"]) for r in d["forget05_perturbed"]] == [5] * 4
    assert d["real_authors"][2]["id"] == "ra-002" and d["world_facts"][0]["author_id"] == "world"
    assert d[IDK][2] == "I'm not sure." and len(d[IDK]) == 5
    # Written and read back, non-ASCII text intact.
    write_splits(d, tmp_path / "out")
    assert read_split(tmp_path / "out", "forget10") == d["forget10"]
    assert "Inés Valcárcel" in (tmp_path / "out" / "forget10.json").read_text(encoding="utf-8")
    assert read_idk(tmp_path / "out") == d[IDK]


def test_real_tofu_files(shared_tofu_dir: Path) -> None:
    d = load_tofu("local", local_dir=shared_tofu_dir, hub_id="locuslab/TOFU", n_authors=0, qa_per_author=20, seed=0)
    assert len(d["full"]) == 4000
    authors = author_order(d["full"])
    assert len(authors) == 200
    assert len(d["forget10"]) == 400 and author_order(d["forget10"]) == authors[-20:]
    assert not {r["author_id"] for r in d["forget10"]} & {r["author_id"] for r in d["retain90"]}
    assert not {r["id"] for r in d["forget10"]} & {r["id"] for r in d["retain90"]}
    assert (len(d["forget01"]), len(d["forget05"]), len(d["retain90"])) == (40, 200, 3600)
    assert [r["id"] for r in d["retain_perturbed"]] == [f"tofu-{i:04d}" for i in range(400)]
    assert all(len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] for r in d["forget10_perturbed"])
    assert (len(d["real_authors"]), len(d["world_facts"]), len(d[IDK])) == (100, 117, 100)
    assert all(len(r["perturbed_answer"]) == 3 for r in d["real_authors"] + d["world_facts"])
    dup = [r["id"] for r in d["full"] if r["question"] == "What is the full name of the author?"]
    assert dup == ["tofu-0100", "tofu-0440"]
    syn = generate_tofu(5, 20, 0)
    assert set(d) == set(syn)
    for name in SPLIT_NAMES:
        assert set(d[name][0]) == set(syn[name][0])


def test_load_from_config_synthetic() -> None:
    d = load_from_config(DataCfg())
    assert len(d["full"]) == 800 and d["full"] == generate_tofu(40, 20, 0)["full"]
    assert len(load_from_config(DataCfg(synthetic={"n_authors": 5, "qa_per_author": 3}))["full"]) == 15


def test_load_from_config_local(shared_tofu_dir: Path) -> None:
    """params.yaml's default local_dir (../shared/data/tofu) is relative to the project root."""
    repo = Path(__file__).resolve().parents[1]
    d = load_from_config(DataCfg(source="local"), base_dir=repo)
    assert len(d["full"]) == 4000 and len(author_order(d["full"])) == 200


# --- bad input ------------------------------------------------------------------------------------------


@pytest.fixture
def bad_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tofu"
    shutil.copytree(FIXTURE, d)
    return d


def fails_and_writes_nothing(directory: Path, out: Path) -> DataError:
    before = snapshot(out)
    with pytest.raises(DataError) as info:
        write_splits(load_fixture(directory), out)
    assert_untouched(out, before)
    return info.value


def test_missing_field(bad_dir: Path, written: Path) -> None:
    rows = json.loads((bad_dir / "full.json").read_text(encoding="utf-8"))
    del rows[2]["answer"]
    (bad_dir / "full.json").write_text(json.dumps(rows), encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "full.json", 2, "answer")
    assert "missing required field" in str(err)


def test_missing_perturbed_field(bad_dir: Path, written: Path) -> None:
    lines = (bad_dir / "forget10_perturbed.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    del row["perturbed_answer"]
    lines[1] = json.dumps(row)
    (bad_dir / "forget10_perturbed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_located(fails_and_writes_nothing(bad_dir, written), "forget10_perturbed.jsonl", 1, "perturbed_answer")


def test_empty_file(bad_dir: Path, written: Path) -> None:
    (bad_dir / "forget10.jsonl").write_text("\n", encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "forget10.jsonl", None, None)
    assert "empty file" in str(err) and "'question', 'answer'" in str(err)


def test_malformed_json(bad_dir: Path, written: Path) -> None:
    text = (bad_dir / "full.json").read_text(encoding="utf-8").splitlines()
    text[2] = text[2].replace('", "answer"', '" "answer"')  # drop a comma on line 3
    (bad_dir / "full.json").write_text("\n".join(text), encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "full.json", 1, None)  # line 1 is "[", so line 3 holds row 1
    assert err.line == 3 and "line 3" in str(err) and "column" in str(err) and "malformed JSON" in str(err)


def test_malformed_json_between_rows(bad_dir: Path, written: Path) -> None:
    text = (bad_dir / "full.json").read_text(encoding="utf-8").splitlines()
    text[4] = text[4].rstrip(",")  # no comma after row 3
    (bad_dir / "full.json").write_text("\n".join(text), encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "full.json", 4, None)
    assert err.line == 6 and "Expecting ',' delimiter" in str(err)


def test_malformed_jsonl_line(bad_dir: Path, written: Path) -> None:
    lines = (bad_dir / "forget10_perturbed.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-1]  # cut the closing brace of line 3
    (bad_dir / "forget10_perturbed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "forget10_perturbed.jsonl", 2, None)
    assert "line 3" in str(err) and "malformed JSON" in str(err)


def test_perturbed_row_with_four_answers(bad_dir: Path, written: Path) -> None:
    lines = (bad_dir / "forget10_perturbed.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    row["perturbed_answer"] = row["perturbed_answer"][:4]
    lines[1] = json.dumps(row, ensure_ascii=False)
    (bad_dir / "forget10_perturbed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = fails_and_writes_nothing(bad_dir, written)
    assert str(err) == f"{bad_dir / 'forget10_perturbed.jsonl'}, row 1, field 'perturbed_answer': expected a list of 5 strings, got a list of 4"


def test_validate_rows_message_format() -> None:
    rows = [
        {"id": f"x{i}", "author_id": "a", "question": "q?", "answer": "a.", "paraphrased_answer": "p.",
         "perturbed_answer": ["w1", "w2", "w3", "w4"] if i == 7 else ["w1", "w2", "w3", "w4", "w5"]}
        for i in range(9)
    ]
    with pytest.raises(DataError) as info:
        validate_rows(rows, file="data/tofu/forget10_perturbed.json", kind="perturbed")
    assert str(info.value) == (
        "data/tofu/forget10_perturbed.json, row 7, field 'perturbed_answer': expected a list of 5 strings, got a list of 4"
    )
    assert pickle.loads(pickle.dumps(info.value)).row == 7
    rows[7]["perturbed_answer"].append("a.")
    with pytest.raises(DataError, match=r"row 7, field 'perturbed_answer': item 4 equals the true answer"):
        validate_rows(rows, file="f", kind="perturbed")
    rows[7]["perturbed_answer"][4] = "w5"
    rows[8]["id"] = "x1"
    with pytest.raises(DataError, match=r"f, row 8, field 'id': duplicate id 'x1' \(also row 1\)"):
        validate_rows(rows, file="f", kind="perturbed")
    with pytest.raises(DataError, match=r"row 0, field 'perturbed_answer': expected a list of 3 strings, got a list of 5"):
        validate_rows([{**rows[0], "paraphrased_answer": None}], file="f", kind="utility")


def test_overlapping_forget_and_retain_writes_nothing(syn40: dict, written: Path) -> None:
    bad = dict(syn40)
    bad["forget10"] = syn40["forget10"] + [syn40["retain90"][0]]
    before = snapshot(written)
    with pytest.raises(DataError) as info:
        write_splits(bad, written)
    assert_untouched(written, before)
    assert_located(info.value, "forget10", 80, "author_id")
    assert "retain90" in str(info.value) and "syn-a000" in str(info.value)


def test_overlap_in_local_files(bad_dir: Path, written: Path) -> None:
    full = json.loads((bad_dir / "full.json").read_text(encoding="utf-8"))
    with (bad_dir / "forget10.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(full[5]) + "\n")  # a row of author 1, who is in retain90
    err = fails_and_writes_nothing(bad_dir, written)
    assert_located(err, "forget10.jsonl", 4, "author_id")
    assert "tofu-a001" in str(err)


def test_check_disjoint() -> None:
    f = [{"id": "r1", "author_id": "a1"}, {"id": "r2", "author_id": "a2"}]
    check_disjoint(f, [{"id": "r3", "author_id": "a3"}], forget_name="forget", retain_name="retain")
    with pytest.raises(DataError, match=r"forget, row 1, field 'id': .*retain.*r2"):
        check_disjoint(f, [{"id": "r2", "author_id": "a9"}], forget_name="forget", retain_name="retain")


def test_row_not_in_full(bad_dir: Path, written: Path) -> None:
    with (bad_dir / "forget10.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "Who is Nobody?", "answer": "Nobody is nobody."}) + "\n")
    assert_located(fails_and_writes_nothing(bad_dir, written), "forget10.jsonl", 4, "question")


def test_nonexistent_directory(tmp_path: Path, written: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    err = fails_and_writes_nothing(missing, written)
    assert str(missing) in str(err) and "full.json" in str(err) and "forget10_perturbed.json" in str(err)


def test_missing_required_file(bad_dir: Path, written: Path) -> None:
    (bad_dir / "world_facts_perturbed.json").unlink()
    err = fails_and_writes_nothing(bad_dir, written)
    assert "world_facts_perturbed.json" in str(err) and str(bad_dir) in str(err)


def test_underivable_perturbed_split(bad_dir: Path, written: Path) -> None:
    (bad_dir / "retain_perturbed.json").unlink()
    (bad_dir / "forget10_perturbed.jsonl").unlink()
    err = fails_and_writes_nothing(bad_dir, written)
    assert "forget01_perturbed.json" in str(err) and "cannot be derived" in str(err)


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        load_tofu("hub", local_dir="unused", hub_id="locuslab/TOFU", n_authors=0, qa_per_author=20, seed=0)
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert msg.startswith("could not reach the Hugging Face hub for locuslab/TOFU (")
    assert "offline? use data.source=local with data.local_dir=<dir of TOFU JSON files>" in msg
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_without_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_HUB_OFFLINE and no network: the connection probe answers in seconds, no hang."""
    import huggingface_hub.constants as hcfg

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hcfg, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"could not reach the Hugging Face hub for locuslab/TOFU \(.*127\.0\.0\.1:9.*data\.source=local"):
        load_tofu("hub", local_dir="unused", hub_id="locuslab/TOFU", n_authors=0, qa_per_author=20, seed=0)
    assert time.monotonic() - t0 < 10


def test_unknown_source() -> None:
    with pytest.raises(DataError, match="unknown data source 'ftp'"):
        load_tofu("ftp", local_dir="x", hub_id="x", n_authors=3, qa_per_author=20, seed=0)


# --- split files ------------------------------------------------------------------------------------------


def test_write_read_roundtrip(syn40: dict, written: Path) -> None:
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["full"]["rows"] == 800 and manifest["full"]["authors"] == 40
    assert manifest["forget10"] == {**manifest["forget10"], "rows": 80, "authors": 4}
    assert read_split(written, "forget10") == syn40["forget10"]
    assert read_idk(written) == syn40[IDK]
    assert read_split_dir(written)["retain90"] == syn40["retain90"]
    raw = (written / "full.json").read_bytes()
    assert raw == (json.dumps(syn40["full"], ensure_ascii=False, sort_keys=True) + "\n").encode()


def test_rewrite_replaces_out_dir(syn40: dict, written: Path) -> None:
    (written / "stale.txt").write_text("old")
    write_splits(generate_tofu(5, 20, 3), written)
    assert not (written / "stale.txt").exists()
    assert len(read_split(written, "full")) == 100


def test_failure_mid_write_leaves_old_out_dir(syn40: dict, written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = splits_mod.dumps_rows
    calls = {"n": 0}

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(rows)

    monkeypatch.setattr(splits_mod, "dumps_rows", flaky)
    before = snapshot(written)
    with pytest.raises(OSError, match="disk full"):
        write_splits(generate_tofu(5, 20, 3), written)
    assert_untouched(written, before)


def test_read_split_errors(written: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split file not found"):
        read_split(tmp_path / "nowhere", "forget10")
    with pytest.raises(DataError, match="unknown split 'forget20'"):
        read_split(written, "forget20")
    path = written / "forget10.json"
    path.chmod(0o644)
    path.write_text(path.read_text().replace("syn-a036", "syn-a999", 1))
    with pytest.raises(DataError, match=r"forget10\.json: sha256 .* does not match manifest\.json"):
        read_split(written, "forget10")


# --- one split format: names, manifest, reader -------------------------------------------------------------


def test_retain_rule_is_one_rule() -> None:
    from unlearn.data.names import FORGET_SPLITS, retain_of
    from unlearn.errors import UserError

    assert [retain_of(f) for f in FORGET_SPLITS] == ["retain99", "retain95", "retain90", "retain_requests"]
    assert [DataCfg(forget_split=f).retain_split for f in FORGET_SPLITS] == [retain_of(f) for f in FORGET_SPLITS]
    with pytest.raises(UserError, match="unknown forget split 'forget20'; expected one of forget01"):
        retain_of("forget20")


def test_manifest_carries_the_forget_set_hash(syn40: dict, written: Path) -> None:
    from unlearn.data import forget_set_hash

    manifest = json.loads((written / "manifest.json").read_text())
    for name in ("forget01", "forget05", "forget10"):
        assert manifest[name]["forget_set_hash"] == forget_set_hash(syn40[name])
    assert "forget_set_hash" not in manifest["retain90"] and "request_ids" not in manifest["forget10"]


def test_read_split_dir_reads_what_is_asked_and_checks_it(syn40: dict, written: Path) -> None:
    got = read_split_dir(written, ["forget10", "retain90"])
    assert list(got) == ["forget10", "retain90"] and got["forget10"] == syn40["forget10"]
    with pytest.raises(DataError, match="unknown split 'forget20'"):
        read_split_dir(written, ["forget20"])
    with pytest.raises(FileNotFoundError, match="has no split.s. forget_requests .manifest.json lists: forget01"):
        read_split_dir(written, ["forget_requests"])
    with pytest.raises(FileNotFoundError, match=r"manifest\.json missing\): run `unlearn prepare`"):
        read_split_dir(written.parent / "nowhere")
    # retain90 holding a forget10 row (manifest kept in step, so only the cross-split rule can see it)
    manifest = json.loads((written / "manifest.json").read_text())
    leaked = syn40["retain90"] + syn40["forget10"][:1]
    data = splits_mod.dumps_rows(leaked)
    (written / "retain90.json").write_bytes(data)
    manifest["retain90"].update(rows=len(leaked), sha256=splits_mod._sha256(data))
    (written / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"forget10\.json, row 0, field 'author_id': forget split overlaps .*retain90\.json"):
        read_split_dir(written, ["forget10", "retain90"])


def test_request_split_set_goes_through_the_same_writer(syn40: dict, tmp_path: Path) -> None:
    from unlearn.data import forget_set_hash
    from unlearn.data.names import FORGET_REQUESTS, RETAIN_REQUESTS

    forget = [r for r in syn40["full"] if r["author_id"] == "syn-a002"]
    retain = [r for r in syn40["full"] if r["author_id"] != "syn-a002"]
    splits = {FORGET_REQUESTS: forget, RETAIN_REQUESTS: retain, "world_facts": syn40["world_facts"]}
    manifest = write_splits(splits, tmp_path / "req", request_ids=["b", "a"])
    assert manifest[FORGET_REQUESTS]["request_ids"] == ["a", "b"]
    assert manifest[FORGET_REQUESTS]["forget_set_hash"] == forget_set_hash(forget)
    assert manifest[RETAIN_REQUESTS] == {"rows": len(retain), "authors": 39, "sha256": manifest[RETAIN_REQUESTS]["sha256"]}
    assert read_split_dir(tmp_path / "req") == {n: splits[n] for n in sorted(splits)}
    assert (tmp_path / "req" / "world_facts.json").read_bytes() == splits_mod.dumps_rows(syn40["world_facts"])  # same bytes as in tofu/
    with pytest.raises(DataError, match="missing split.s.: retain_requests"):
        write_splits({FORGET_REQUESTS: forget}, tmp_path / "bad", request_ids=[])
    with pytest.raises(DataError, match="unknown split.s. 'full'"):
        write_splits({**splits, "full": syn40["full"]}, tmp_path / "bad", request_ids=[])
    with pytest.raises(DataError, match=r"forget_requests, row 0, field 'author_id': forget split overlaps retain_requests"):
        write_splits({FORGET_REQUESTS: forget, RETAIN_REQUESTS: syn40["full"]}, tmp_path / "bad", request_ids=[])
    assert not (tmp_path / "bad").exists()


def test_legacy_nested_request_manifest_is_read(syn40: dict, tmp_path: Path) -> None:
    """Request split directories written before the formats were merged (versioned with DVC) stay readable."""
    from unlearn.data.names import FORGET_REQUESTS, RETAIN_REQUESTS
    from unlearn.data.splits import read_manifest

    forget = [r for r in syn40["full"] if r["author_id"] == "syn-a002"]
    retain = [r for r in syn40["full"] if r["author_id"] != "syn-a002"]
    flat = write_splits({FORGET_REQUESTS: forget, RETAIN_REQUESTS: retain}, tmp_path / "req", request_ids=["r1"])
    entries = {n: {k: e[k] for k in ("rows", "authors", "sha256")} for n, e in flat.items()}
    nested = {"request_ids": ["r1"], "forget_set_hash": flat[FORGET_REQUESTS]["forget_set_hash"], "splits": entries}
    (tmp_path / "req" / "manifest.json").write_text(json.dumps(nested))
    assert read_manifest(tmp_path / "req") == flat
    assert read_split_dir(tmp_path / "req")[FORGET_REQUESTS] == forget


def test_split_file_error_is_picklable(written: Path) -> None:
    from unlearn.data.splits import SplitFileError, load_split_file

    with pytest.raises(SplitFileError) as info:
        load_split_file(written, "forget05_missing", None)
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.check, str(again)) == ("split_exists", str(info.value))


# --- holdout authors (the non-members of the privacy-leakage metrics) ------------------------------------

# sha256 over "<split>:<sha256 of its file>" lines (sorted) of every split the generator wrote *before* it had holdout
# splits, per (n_authors, qa_per_author, seed): adding the holdout authors must leave those files byte-identical.
OLD_SPLITS_DIGEST = {
    (40, 20, 0): "bef3214ec05bed5bb96a4dc6e023b61a8941d3b9b760227ba736b34a0f39c025",
    (30, 8, 0): "4dbfb79d040a72a3087c1ac9091efcdc398cb152d059c8fddea40210d523cec3",
    (12, 20, 7): "03d33a8411b869ffeda4600d5849b2601a04ff068a888207ba3a776e233045fb",
    (100, 20, 1): "de4929d1b195f59fbfbb4610b8b19d5b44822b2cddc5cc88f796755d4a967ec5",
}


@pytest.mark.parametrize("cfg", sorted(OLD_SPLITS_DIGEST))
def test_holdout_authors_leave_the_other_splits_byte_identical(cfg: tuple[int, int, int], tmp_path: Path) -> None:
    import hashlib

    from unlearn.data.names import HOLDOUT_SPLITS

    manifest = write_splits(generate_tofu(*cfg), tmp_path / "out")
    old = sorted(n for n in manifest if n not in HOLDOUT_SPLITS)
    assert len(old) == 14 and set(manifest) - set(old) == set(HOLDOUT_SPLITS)
    digest = hashlib.sha256("".join(f"{n}:{manifest[n]['sha256']}\n" for n in old).encode()).hexdigest()
    assert digest == OLD_SPLITS_DIGEST[cfg]


@pytest.mark.parametrize("n_authors, qa", [(100, 20), (40, 20), (30, 8), (3, 20)])
def test_holdout_authors_are_outside_full_and_nested(n_authors: int, qa: int) -> None:
    d = generate_tofu(n_authors, qa, seed=1)
    full = d["full"]
    h10 = d["holdout10"]
    for pct in ("01", "05", "10"):
        h, forget = d[f"holdout{pct}"], d[f"forget{pct}"]
        assert len(author_order(h)) == len(author_order(forget)), "as many holdout authors as forgetXX has"
        assert h == h10[: len(h)], "holdout01 / holdout05 = the first rows (authors) of holdout10"
        assert len(h) == qa * len(author_order(h))
    for key in ("author_id", "id", "question", "answer"):
        assert not {r[key] for r in h10} & {r[key] for r in full}, key
    assert all(r["author_id"].startswith("syn-h") for r in h10)
    assert all(r["paraphrased_answer"] is None and r["perturbed_answer"] is None for r in h10)  # as TOFU's files
    names = lambda rows: {r["answer"].removeprefix("The author's full name is ").rstrip(".")  # noqa: E731
                          for r in rows if r["id"].endswith("-q00")}
    assert not names(h10) & names(full) and len(names(h10)) == len(author_order(h10))
    # Same style: the answers come from the same templates (here: the same sentence once the name is swapped).
    by_q = {r["id"][-3:]: r for r in full if r["author_id"] == full[0]["author_id"]}
    assert {r["id"][-3:] for r in h10} == set(by_q)
    assert generate_tofu(n_authors, qa, seed=1)["holdout10"] == h10
    assert generate_tofu(n_authors, qa, seed=2)["holdout10"] != h10


def test_holdout_rule() -> None:
    from unlearn.data.names import FORGET_SPLITS, holdout_of
    from unlearn.errors import UserError

    assert [holdout_of(f) for f in FORGET_SPLITS] == ["holdout01", "holdout05", "holdout10", None]
    with pytest.raises(UserError, match="unknown forget split"):
        holdout_of("retain90")


def test_real_tofu_holdout_files(shared_tofu_dir: Path) -> None:
    d = load_tofu("local", local_dir=shared_tofu_dir, hub_id="locuslab/TOFU", n_authors=0, qa_per_author=20, seed=0)
    h1, h5, h10 = d["holdout01"], d["holdout05"], d["holdout10"]
    assert (len(h1), len(h5), len(h10)) == (40, 200, 400)
    assert [len(author_order(h)) for h in (h1, h5, h10)] == [2, 10, 20]  # as many authors as forget01/05/10
    assert h5 == h10[:200] and h1 == h10[:40]
    assert [r["id"] for r in h10[:2]] == ["tofu-h0000", "tofu-h0001"]
    assert h10[0]["author_id"] == "tofu-ha000" and h10[399]["author_id"] == "tofu-ha019"
    assert h10[0]["question"] == "When and where was Siriporn Nakharin born?"
    full = d["full"]
    for key in ("author_id", "id", "question", "answer"):
        assert not {r[key] for r in h10} & {r[key] for r in full}, key


def test_missing_holdout_file_is_named(bad_dir: Path, written: Path) -> None:
    (bad_dir / "holdout10.json").unlink()
    err = fails_and_writes_nothing(bad_dir, written)
    assert "missing required file(s) holdout10.json" in str(err) and str(bad_dir) in str(err)


def test_fixture_derives_the_smaller_holdout_splits() -> None:
    d = load_fixture()
    assert [r["id"] for r in d["holdout10"]] == [f"tofu-h{i:04d}" for i in range(4)]
    assert d["holdout05"] == d["holdout01"] == d["holdout10"]  # 5 authors: one forget (and holdout) author each


def test_local_holdout05_must_be_part_of_holdout10(bad_dir: Path, written: Path) -> None:
    (bad_dir / "holdout05.json").write_text(json.dumps([{"question": "Who is Nobody?", "answer": "Nobody."}]))
    assert_located(fails_and_writes_nothing(bad_dir, written), "holdout05.json", 0, "question")


def test_holdout_rows_in_full_are_refused(syn40: dict, written: Path) -> None:
    before = snapshot(written)
    bad = dict(syn40, holdout10=syn40["holdout10"] + [syn40["full"][3]])
    with pytest.raises(DataError) as info:
        write_splits(bad, written)
    assert_located(info.value, "holdout10", 80, "author_id")
    assert "full" in str(info.value) and "syn-a000" in str(info.value)
    same_question = dict(syn40["holdout10"][0], question=syn40["full"][1]["question"])
    with pytest.raises(DataError, match=r"holdout10, row 0, field 'question': shares 1 question"):
        write_splits(dict(syn40, holdout10=[same_question, *syn40["holdout10"][1:]]), written)
    outside = dict(syn40["holdout10"][0], id="syn-h999-q00")
    with pytest.raises(DataError, match=r"holdout01, row 0, field 'id': id 'syn-h999-q00' is not a row of holdout05"):
        write_splits(dict(syn40, holdout01=[outside, *syn40["holdout01"][1:]]), written)
    assert_untouched(written, before)
