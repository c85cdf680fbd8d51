"""params.yaml parsing: defaults, overrides, errors that name the key, and the knob reference (docs/params.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pydantic import BaseModel, ValidationError

from unlearn.config import (
    ConfigError,
    FinetuneCfg,
    GateCfg,
    MethodCfg,
    MlflowCfg,
    OptimCfg,
    Params,
    RequestsCfg,
    format_value,
    knobs,
    load_params,
    params_markdown,
    select_knobs,
)

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_match_defaults():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "synthetic"
    assert p.data.retain_split == "retain90"
    assert p.method.dipo.k >= 1 and p.cache.top_k >= 1


def test_overrides_are_typed_and_nested():
    p = load_params(ROOT / "params.yaml", ["method.name=npo", "method.lr=1e-5", "data.forget_split=forget05", "seed=7"])
    assert (p.method.name, p.method.lr, p.data.retain_split, p.seed) == ("npo", 1e-5, "retain95", 7)


@pytest.mark.parametrize(
    "override, needle",
    [("data.source=ftp", "data.source"), ("method.dipo.k=0", "method.dipo.k"), ("model.archh.x=1", "model.archh"),
     ("finetune.epochs=many", "finetune.epochs"), ("novalue", "KEY=VALUE")],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml"):
        load_params(bad)


def test_gate_tracking_requests_are_typed_sections(tmp_path):
    # Formerly kept verbatim in Params.extra; now typed sections like the others.
    f = tmp_path / "params.yaml"
    f.write_text("gate:\n  min_forget_quality: 0.05\n")
    p = load_params(f)
    assert p.gate.min_forget_quality == 0.05
    assert (p.gate.min_utility_ratio, p.tracking.experiment, p.requests.schedule_cron) == (0.9, "dipo-unlearn", "*/30 * * * *")


@pytest.mark.parametrize(
    "override, needle",
    [("gatee.min_forget_quality=0.1", "gatee: unknown section; did you mean gate?"),
     ("requests.inbx=x", "requests.inbx: unknown key; did you mean requests.inbox?"),
     ("tracking.urii=x", "expected one of: uri, experiment, registered_model, artifact_location"),
     ("gate.min_forget_quality=2", "gate.min_forget_quality"), ("requests.schedule_cron=hourly", "5-field cron")],
)
def test_unknown_or_bad_keys_in_every_section_are_errors(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_params(ROOT / "params.yaml", [override])


def test_null_means_default_where_the_untyped_readers_allowed_it(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("gate:\ntracking: {experiment: null, uri: ''}\nrequests:\n")
    p = load_params(f)
    assert (p.gate, p.requests) == (GateCfg(), RequestsCfg())
    assert (p.tracking.experiment, p.tracking.uri) == ("dipo-unlearn", None)
    with pytest.raises(ConfigError, match="method"):  # the other sections never allowed it
        load_params(tmp_path / "none.yaml", ["method=null"])


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *sorted(p for p in (ROOT / "configs").glob("*.yaml")
                                                             if not p.name.startswith("study"))], ids=lambda p: p.name)
def test_every_params_file_of_the_project_loads(path):
    load_params(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study*.yaml")), ids=lambda p: p.name)
def test_every_study_file_loads_and_its_params_too(path):
    from unlearn.study.spec import load_spec

    spec = load_spec(path)
    load_params(ROOT / spec.params, list(spec.overrides))


def test_consumers_read_the_typed_sections(tmp_path, monkeypatch):
    from unlearn import tracking
    from unlearn.requests import ledger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = load_params(ROOT / "params.yaml", ["gate.min_utility_ratio=0.5", "tracking.artifact_location=art",
                                           "requests.inbox=in"])
    assert tracking.gate_config(p) == {"min_forget_quality": 0.05, "min_utility_ratio": 0.5, "max_abs_privleak": 25.0}
    assert tracking.tracking_config(p, tmp_path).artifact_location == str(tmp_path / "art")
    assert ledger.requests_settings(p) is p.requests and p.requests.inbox == "in"
    assert ledger.RequestsCfg is RequestsCfg  # re-exported where it used to live
    # The defaults the consumers used to hold are the typed sections' defaults.
    assert GateCfg().model_dump() == tracking.DEFAULT_GATE
    assert (MlflowCfg().experiment, MlflowCfg().registered_model) == (tracking.DEFAULT_EXPERIMENT,
                                                                      tracking.DEFAULT_REGISTERED_MODEL)
    assert RequestsCfg().url == f"sqlite:///{ledger.DEFAULT_LEDGER_PATH}"


# --------------------------------------------------------------------------- optimiser sections
def test_optimiser_sections_share_one_definition_and_keep_their_defaults():
    assert issubclass(FinetuneCfg, OptimCfg) and issubclass(MethodCfg, OptimCfg)
    optim = list(OptimCfg.model_fields)
    assert optim == ["epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_accum"]
    assert {k: getattr(FinetuneCfg(), k) for k in optim} == dict(
        epochs=12, batch_size=32, lr=3e-3, weight_decay=0.01, warmup_ratio=0.1, grad_accum=1)
    assert {k: getattr(MethodCfg(), k) for k in optim} == dict(
        epochs=5, batch_size=16, lr=5e-4, weight_decay=0.0, warmup_ratio=0.0, grad_accum=1)
    assert (FinetuneCfg().include_general, MethodCfg().alpha, MethodCfg().checkpoint_every) == (True, 1.0, 0)
    for field in optim:  # one constraint and description for both stages
        assert FinetuneCfg.model_fields[field].metadata == MethodCfg.model_fields[field].metadata
        assert FinetuneCfg.model_fields[field].description == MethodCfg.model_fields[field].description


def test_loop_cfg_from_optim_matches_the_hand_built_loops():
    from unlearn.train import LoopCfg

    p = load_params(ROOT / "params.yaml", ["seed=3", "method.grad_accum=2", "method.checkpoint_every=7"])
    ft, m = p.finetune, p.method
    assert LoopCfg.from_optim(ft, seed=p.seed, desc="finetune target") == LoopCfg(
        epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, weight_decay=ft.weight_decay,
        warmup_ratio=ft.warmup_ratio, grad_accum=ft.grad_accum, seed=p.seed, desc="finetune target",
    )
    assert LoopCfg.from_optim(m, seed=p.seed, checkpoint_every=m.checkpoint_every, desc="forget [dipo]") == LoopCfg(
        epochs=m.epochs, batch_size=m.batch_size, lr=m.lr, weight_decay=m.weight_decay, warmup_ratio=m.warmup_ratio,
        grad_accum=m.grad_accum, seed=p.seed, checkpoint_every=m.checkpoint_every, desc="forget [dipo]",
    )


# --------------------------------------------------------------------------- descriptions, `unlearn params`, docs
def _sections(model=Params, seen=None):
    seen = seen if seen is not None else []
    seen.append(model)
    for f in model.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and f.annotation not in seen:
            _sections(f.annotation, seen)
    return seen


def test_every_field_of_every_section_has_a_one_line_description():
    sections = _sections()
    assert {GateCfg, MlflowCfg, RequestsCfg, FinetuneCfg, MethodCfg} <= set(sections)
    missing = [f"{s.__name__}.{name}" for s in sections for name, f in s.model_fields.items()
               if not (f.description and f.description.strip() and "\n" not in f.description)]
    assert not missing, f"fields without a one-line description: {missing}"


def test_knobs_list_every_leaf_with_type_default_and_value():
    ks = {k.name: k for k in knobs(load_params(ROOT / "params.yaml", ["method.dipo.k=3"]))}
    assert len(ks) > 60 and "method.dipo" not in ks and "extra" not in ks
    k = ks["method.dipo.k"]
    assert (k.type, k.default, k.value) == ("int (>= 1)", 1, 3) and k.description
    assert ks["data.source"].type == "synthetic | local | hub"
    assert ks["model.path"].type == "str | null"
    assert ks["finetune.epochs"].default == 12 and ks["finetune.epochs"].value == 15  # code default vs params.yaml
    assert {"gate.min_forget_quality", "tracking.uri", "requests.schedule_cron"} <= set(ks)
    assert format_value(ks["requests.schedule_cron"].value) == '"*/30 * * * *"'
    assert [k.name for k in select_knobs(list(ks.values()), ["gate"])] == ["gate.min_forget_quality",
                                                                           "gate.min_utility_ratio",
                                                                           "gate.max_abs_privleak"]
    with pytest.raises(ConfigError, match="no such knob or section: gat"):
        select_knobs(list(ks.values()), ["gat"])


def test_unlearn_params_command():
    from typer.testing import CliRunner

    from unlearn.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["params", "--params", str(ROOT / "params.yaml"), "--set", "method.dipo.k=3", "method.dipo"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("method.dipo.k "))
    assert line.split()[:4] == ["method.dipo.k", "int", "(>=", "1)"] and " 3 " in line and "top-k" in line
    assert "method.lr" not in res.output
    res = runner.invoke(app, ["params", "--params", str(ROOT / "params.yaml"), "--set", "gate.typo=1"])
    assert res.exit_code == 2 and "gate.typo" in res.output


def test_docs_params_md_is_up_to_date():
    expected = params_markdown(load_params(ROOT / "params.yaml"), source="params.yaml")
    assert (ROOT / "docs" / "params.md").read_text() == expected, (
        "docs/params.md is stale: regenerate it with `unlearn params --markdown > docs/params.md`")
    assert "docs/params.md" in (ROOT / "README.md").read_text()
