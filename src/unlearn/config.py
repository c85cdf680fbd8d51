"""Typed view of ``params.yaml``.

Every stage reads its knobs from here rather than from ad-hoc dicts, so a typo
in ``params.yaml`` (or in a ``--set a.b=value`` override) fails at start-up with
the offending key named, not half-way through a training run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SyntheticCfg(_Strict):
    n_authors: int = Field(40, ge=3)
    qa_per_author: int = Field(20, ge=1, le=20)
    seed: int = 0


class DataCfg(_Strict):
    source: Literal["synthetic", "local", "hub"] = "synthetic"
    out_dir: str = "data/tofu"
    local_dir: str = "../shared/data/tofu"
    hub_id: str = "locuslab/TOFU"
    forget_split: Literal["forget01", "forget05", "forget10", "forget_requests"] = "forget10"
    synthetic: SyntheticCfg = SyntheticCfg()

    @property
    def retain_split(self) -> str:
        """TOFU convention: retainXX is the complement of forget(100-XX); request splits pair up by name."""
        if self.forget_split == "forget_requests":
            return "retain_requests"
        return "retain" + str(100 - int(self.forget_split[-2:]))


class TokenizerCfg(_Strict):
    vocab_size: int = Field(2048, ge=300)


class ArchCfg(_Strict):
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 576
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


class ModelCfg(_Strict):
    path: str | None = None
    out_dir: str = "models"
    max_length: int = Field(96, ge=8)
    tokenizer: TokenizerCfg = TokenizerCfg()
    arch: ArchCfg = ArchCfg()


class FinetuneCfg(_Strict):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    grad_accum: int = Field(1, ge=1)
    include_general: bool = True


class DiPOCfg(_Strict):
    k: int = Field(1, ge=1)
    gamma: float = Field(5.0, ge=0)
    beta: float = Field(0.1, gt=0)
    mask: Literal["topk", "gold"] = "topk"
    reference: Literal["fixed", "online"] = "fixed"


class NPOCfg(_Strict):
    beta: float = Field(0.1, gt=0)


class SimNPOCfg(_Strict):
    beta: float = Field(4.5, gt=0)
    delta: float = 0.0
    forget_weight: float = 0.125


class DPOCfg(_Strict):
    beta: float = Field(0.1, gt=0)


class UndialCfg(_Strict):
    beta: float = Field(10.0, ge=0)


class MethodCfg(_Strict):
    name: str = "dipo"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    grad_accum: int = Field(1, ge=1)
    alpha: float = Field(1.0, ge=0, description="weight of the retain term")
    retain_loss: Literal["nll", "kl"] = "nll"
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    dipo: DiPOCfg = DiPOCfg()
    npo: NPOCfg = NPOCfg()
    simnpo: SimNPOCfg = SimNPOCfg()
    dpo: DPOCfg = DPOCfg()
    undial: UndialCfg = UndialCfg()


class CacheCfg(_Strict):
    dir: str = "cache"
    top_k: int = Field(64, ge=1)
    retain: bool = Field(False, description="also cache top-K on the retain split (needed by retain_loss: kl)")


class EvalCfg(_Strict):
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    generation_examples: int | None = Field(None, description="cap on examples generated per split (None = all)")
    report_examples: int = 5


class Params(_Strict):
    seed: int = 0
    reports_dir: str = "reports"
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    method: MethodCfg = MethodCfg()
    cache: CacheCfg = CacheCfg()
    eval: EvalCfg = EvalCfg()
    # Sections owned by later stages (pipeline, orchestration) are kept verbatim.
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra", mode="before")
    @classmethod
    def _none_to_dict(cls, v: Any) -> Any:
        return {} if v is None else v


class ConfigError(ValueError):
    """A bad ``params.yaml`` or override: the message names the key and the expectation."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["method.name=npo", "seed=3"]`` -> ``[("method.name", "npo"), ("seed", 3)]`` (values parsed as YAML)."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. method.name=npo")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


KNOWN_SECTIONS = {"seed", "reports_dir", "data", "model", "finetune", "method", "cache", "eval"}


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing file -> defaults), apply overrides, validate."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    known = {k: v for k, v in raw.items() if k in KNOWN_SECTIONS}
    extra = {k: v for k, v in raw.items() if k not in KNOWN_SECTIONS}
    try:
        return Params(**known, extra=extra)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{path}: invalid parameters\n" + "\n".join(lines)) from None
