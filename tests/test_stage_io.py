"""unlearn.stages.stage_io: the one declaration of what each stage reads and writes.

It must agree with dvc.yaml (deps, outs/metrics/plots, params) for the default
parameters, so the two cannot drift; and the Prefect cache key is built from it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from unlearn import stages
from unlearn.config import ModelCfg, Params, load_params

ROOT = Path(__file__).resolve().parents[1]

DVC_STAGES = {  # dvc.yaml stage -> the library stage and the keyword arguments its `cmd` passes
    "prepare": ("prepare", {}),
    "tokenizer": ("tokenizer", {}),
    "validate": ("validate", {}),
    "finetune_target": ("finetune", {"role": "target"}),
    "finetune_retain": ("finetune", {"role": "retain"}),
    "cache": ("cache", {}),
    "forget": ("forget", {}),
    "evaluate_retain": ("evaluate", {"model_path": "models/retain", "name": "retain"}),
    "evaluate_target": ("evaluate", {"model_path": "models/target", "name": "target"}),
    "evaluate_unlearned": ("evaluate", {"model_path": "models/unlearned", "name": "unlearned"}),
    "register": ("register", {}),
}


MUSE_STAGES = {  # muse/dvc.yaml: the same stage functions on muse/params.yaml, plus MUSE's two sequences
    **{k: v for k, v in DVC_STAGES.items() if not k.startswith("evaluate_")},
    **{f"evaluate_{n}": ("evaluate", {"model_path": f"muse/models/{n}", "name": n}) for n in ("retain", "target", "unlearned")},
    "sustainability": ("sequence", {"kind": "sustainability"}),
    "scalability": ("sequence", {"kind": "scalability"}),
}
PIPELINES = {"tofu": ("dvc.yaml", "params.yaml", DVC_STAGES), "muse": ("muse/dvc.yaml", "muse/params.yaml", MUSE_STAGES)}


def _params_of(spec: dict, params_file: str) -> set[str]:
    """dvc.yaml ``params:`` (keys of params.yaml, or ``{file: [keys]}`` for another file) -> the keys."""
    keys = set()
    for e in spec.get("params") or []:
        if isinstance(e, str):
            keys.add(e)
        else:
            assert set(e) == {params_file}, f"params from {set(e)}, expected {params_file}"
            keys.update(e[params_file])
    return keys


def _paths(entries) -> set[str]:
    """dvc.yaml outs/metrics/plots entries (a path, or {path: options}) -> their paths."""
    out = set()
    for e in entries or []:
        out.update([e] if isinstance(e, str) else e.keys())
    return out


def _covers(dep: str, path: Path) -> bool:
    """dvc.yaml dep ``dep`` covers ``path`` when it is that path or a directory above it."""
    return path == Path(dep) or Path(dep) in path.parents


def _dvc(pipeline: str) -> dict:
    return yaml.safe_load((ROOT / PIPELINES[pipeline][0]).read_text())["stages"]


def test_every_dvc_stage_is_declared():
    assert set(_dvc("tofu")) == set(DVC_STAGES)
    assert set(_dvc("muse")) == set(MUSE_STAGES)
    assert {stage for stage, _ in [*DVC_STAGES.values(), *MUSE_STAGES.values()]} == set(stages.STAGES)
    for spec in _dvc("muse").values():  # every MUSE stage runs in the project root, on muse/params.yaml
        assert spec["wdir"] == ".." and spec["cmd"].endswith("--params muse/params.yaml")


@pytest.mark.parametrize("pipeline, name", [(k, n) for k, (_, _, names) in PIPELINES.items() for n in names])
def test_stage_io_agrees_with_dvc_yaml(pipeline, name):
    _, params_file, names = PIPELINES[pipeline]
    p = load_params(ROOT / params_file)
    stage, kwargs = names[name]
    io = stages.stage_io(stage, p, **kwargs)
    spec = _dvc(pipeline)[name]
    outs = _paths(spec.get("outs")) | _paths(spec.get("metrics")) | _paths(spec.get("plots"))
    assert {str(o) for o in io.outputs} == outs
    deps = list(spec.get("deps") or [])
    assert set(io.code) == {d for d in deps if d.startswith("src/")}
    data_deps = [d for d in deps if not d.startswith("src/")]
    declared = [*io.inputs, *io.after]
    for path in declared:
        assert any(_covers(d, path) for d in data_deps), f"{name}: {path} is not a dvc.yaml dep"
    for d in data_deps:
        assert any(_covers(d, path) for path in declared), f"{name}: dvc.yaml dep {d} is not declared"
    assert set(io.params) == _params_of(spec, params_file)


def test_stage_io_takes_keywords_only_by_name():
    p = Params()
    with pytest.raises(TypeError, match="roel"):
        stages.stage_io("finetune", p, roel="target")
    with pytest.raises(KeyError, match="unknown stage 'train'"):
        stages.stage_io("train", p)
    out = stages.stage_io("finetune", p, role="retain", out_dir="models/requests/abc/retain").outputs
    assert out == [Path("models/requests/abc/retain"), Path("models/requests/abc/retain.reports/retain.json"),
                   Path("models/requests/abc/retain.reports/retain_loss.json")]


def _io(stage: str, p: Params, **kwargs):
    io = stages.stage_io(stage, p, **kwargs)
    return io.inputs, io.outputs


def test_flow_cache_keys_cover_the_tokenizer(tmp_path):
    p = Params(model=ModelCfg(out_dir=str(tmp_path / "models")))
    tok_file = tmp_path / "models" / "tokenizer" / "tokenizer.json"
    ins, outs = _io("tokenizer", p)
    assert outs == [tmp_path / "models" / "tokenizer"]
    ins, _ = _io("finetune", p, role="target")
    assert tok_file in ins
    real = Params(model=ModelCfg(out_dir=str(tmp_path / "models"), path="some/checkpoint"))
    assert _io("tokenizer", real)[1] == []
    assert tok_file not in _io("finetune", real, role="target")[0]
    # the key follows the tokenizer's content
    tok_file.parent.mkdir(parents=True)
    tok_file.write_text('{"v": 1}')
    before = stages.stage_key("finetune", p, role="target", out_dir=None)
    tok_file.write_text('{"v": 2}')
    assert stages.stage_key("finetune", p, role="target", out_dir=None) != before
    src = (ROOT / "flows" / "pipelines.py").read_text()
    for flow in ("def benchmark_pipeline", "def requests_pipeline"):
        body = src[src.index(flow):]
        assert body.index("tokenizer_task") < body.index("validate_task(") < body.index("finetune_task"), flow


def test_prefect_cache_key_is_the_library_stage_key(tmp_path):
    pytest.importorskip("prefect")
    spec = importlib.util.spec_from_file_location("flows_pipelines_under_test", ROOT / "flows" / "pipelines.py")
    flows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flows)
    assert {flows.tokenizer_task.fn: "tokenizer", flows.finetune_task.fn: "finetune",
            flows.cache_task.fn: "cache"} == flows._STAGE_OF
    params = tmp_path / "params.yaml"
    params.write_text(f"model: {{out_dir: {tmp_path / 'models'}}}\n")
    call = {"params_path": str(params), "overrides": ["seed=3"], "role": "retain", "out_dir": None}
    want = stages.stage_key("finetune", load_params(params, ["seed=3"]), role="retain", out_dir=None)
    assert flows.stage_cache_key("finetune")(None, call) == want
    assert flows.stage_cache_key("finetune")(None, {**call, "role": "target"}) != want
