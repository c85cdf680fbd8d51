"""params.yaml parsing: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.config import ConfigError, load_params

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


def test_unknown_top_level_sections_are_kept_for_later_stages(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("gate:\n  min_forget_quality: 0.05\n")
    assert load_params(f).extra["gate"]["min_forget_quality"] == 0.05
