"""Typed view of ``params.yaml``: every section, every knob, each with a one-line description.

Every stage reads its knobs from here rather than from ad-hoc dicts, so a typo
in ``params.yaml`` (or in a ``--set a.b=value`` override) fails at start-up with
the offending key named, not half-way through a training run. That includes the
sections only the last stages read (``gate``, ``tracking``, ``requests``): a bad
gate used to surface only at registration, after the whole pipeline had run.
An unknown top-level section is an error for the same reason.

The descriptions are data, not comments: :func:`knobs` lists every knob with its
type, default, current value and description; ``unlearn params`` prints that list
and ``docs/params.md`` is generated from it (``tests/test_config.py`` fails when the
file is stale), so the reference cannot drift from the code.
"""

from __future__ import annotations

import copy
import difflib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class _Strict(BaseModel):
    """Base of every section: an unknown key is an error, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _NullMeansDefault(_Strict):
    """A section in which ``key: null`` (or an empty string) means "use the default".

    Why: before ``gate``/``tracking`` were typed, their readers did ``value or DEFAULT``,
    so a ``params.yaml`` with ``experiment: null`` or a blanked-out value worked; it still does.
    """

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in cls.model_fields and (v is None or v == ""))}
        return data


class SyntheticCfg(_Strict):
    """``data.synthetic``: the generator of fictitious TOFU-style authors (``data.source: synthetic``)."""

    n_authors: int = Field(40, ge=3, description="fictitious authors to generate")
    qa_per_author: int = Field(20, ge=1, le=20, description="QA pairs per author (TOFU has 20)")
    seed: int = Field(0, description="seed of the generator (names, facts, perturbed answers)")


class DataCfg(_Strict):
    """``data``: where the QA rows come from and where the prepared splits go."""

    source: Literal["synthetic", "local", "hub"] = Field(
        "synthetic", description="generated authors, a local directory of TOFU files, or the Hugging Face hub")
    out_dir: str = Field("data/tofu", description="where the prepared splits and manifest.json are written (a DVC output)")
    local_dir: str = Field("../shared/data/tofu",
                           description="source=local: directory of TOFU JSON/JSONL files (relative to the project root)")
    hub_id: str = Field("locuslab/TOFU", description="source=hub: dataset id for datasets.load_dataset(hub_id, split)")
    forget_split: Literal["forget01", "forget05", "forget10", "forget_requests",
                          "fold1", "fold2", "fold3", "fold4", "fold1-2", "fold1-3", "fold1-4"] = Field(
        "forget10", description="TOFU: split to unlearn, its retain split is the complement (forget_requests: the "
                                "request flow's); MUSE: fold(s) to unlearn, the later folds are kept")
    synthetic: SyntheticCfg = Field(default_factory=SyntheticCfg, description="source=synthetic: the generator's knobs")

    @property
    def retain_split(self) -> str:
        """The retain split paired with ``forget_split`` (forget10 -> retain90, forget_requests -> retain_requests).

        The rule is :func:`unlearn.data.names.retain_of`, written once; it is imported here, not at the top,
        because the data package imports this module.
        """
        from .data.names import retain_of

        return retain_of(self.forget_split)


class TokenizerCfg(_Strict):
    """``model.tokenizer``: the byte-level BPE tokenizer trained on the splits (not used with ``model.path``)."""

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size")


class TemplateCfg(_Strict):
    """``model.template``: the prompt format of every QA row (fine-tuning, cache, unlearning, scoring, generation).

    A real checkpoint is scored in the format it was fine-tuned on; the presets mirror
    open-unlearning's model configs (see :mod:`unlearn.models.template`). TOFU only:
    MUSE scores raw text and asks its QA in MUSE's own few-shot format.
    """

    preset: Literal["plain", "phi_1_5", "llama2_chat", "llama3_instruct", "chat"] = Field(
        "plain", description=("plain / phi_1_5: a 'Question: {question}' line then 'Answer: {answer}'; llama2_chat: "
                              "'[INST] {question} [/INST] {answer}'; llama3_instruct / chat: the tokenizer's chat template"))
    format: str | None = Field(
        None, description="a text template with one {question} then one {answer}: overrides the preset's text")
    system_prompt: str | None = Field(
        None, description="chat presets: the system message (null: the preset's; llama3_instruct: 'You are a helpful assistant.')")
    chat_template: str | None = Field(
        None, description="chat presets: a Jinja chat template to use instead of the tokenizer's own (null: the tokenizer's)")

    @field_validator("format")
    @classmethod
    def _slots(cls, v: str | None) -> str | None:
        return None if v is None else check_template_text(v)


def check_template_text(text: str, where: str = "model.template.format") -> str:
    """``text`` has exactly one ``{question}`` before exactly one ``{answer}``; returns it (ValueError otherwise)."""
    q, a = "{question}", "{answer}"
    if text.count(q) != 1 or text.count(a) != 1 or text.index(q) > text.index(a):
        raise ValueError(f"{where} must hold one {q} followed by one {a}, got {text!r}")
    return text


class ArchCfg(_Strict):
    """``model.arch``: ``LlamaConfig`` fields of the from-scratch model (not used with ``model.path``)."""

    hidden_size: int = Field(192, description="width of the residual stream")
    num_hidden_layers: int = Field(4, description="transformer blocks")
    num_attention_heads: int = Field(4, description="attention heads per block")
    num_key_value_heads: int = Field(4, description="key/value heads (fewer than attention heads: grouped-query attention)")
    intermediate_size: int = Field(576, description="width of the MLP")
    max_position_embeddings: int = Field(128, description="longest sequence the model takes (keep >= model.max_length)")
    rope_theta: float = Field(10000.0, description="RoPE base frequency")
    tie_word_embeddings: bool = Field(True, description="share the input embedding and output projection weights")


class ModelCfg(_Strict):
    """``model``: the model to fine-tune and where the trained models go."""

    path: str | None = Field(
        None, description="null: build the small Llama of model.arch; else a local Hugging Face directory or a hub id")
    out_dir: str = Field("models", description="where the tokenizer/, target/, retain/ and unlearned/ models are written")
    max_length: int = Field(
        96, ge=8, description="tokens per QA example (prompt + answer + EOS); longer rows are cut, EOS kept")
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg, description="the tokenizer trained from the splits")
    template: TemplateCfg = Field(default_factory=TemplateCfg, description="the prompt format of QA rows (presets, chat template)")
    arch: ArchCfg = Field(default_factory=ArchCfg, description="architecture of the from-scratch model")


# The optimiser knobs shared by fine-tuning and unlearning: one definition of each constraint and description.
# OptimCfg's own defaults are train.LoopCfg's; each stage's section states its own run size (and overrides).
Epochs = Annotated[int, Field(ge=1, description="passes over the training rows")]
BatchSize = Annotated[int, Field(ge=1, description="rows per micro-batch per process (a step: x processes x grad_accum)")]
LearningRate = Annotated[float, Field(gt=0, description="peak AdamW learning rate (linear warm-up, then linear decay to 0)")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay (not on biases and norms)")]
WarmupRatio = Annotated[float, Field(ge=0, le=1, description="share of the optimizer steps spent warming up the learning rate")]
GradAccum = Annotated[int, Field(ge=1, description="micro-batches accumulated per optimizer step")]


class LoraCfg(_Strict):
    """``finetune.lora`` / ``method.lora``: train a LoRA adapter (``peft``) instead of every weight.

    The frozen base is the starting model (for unlearning: the target, i.e. the reference the cache holds).
    The saved model is the merged one (base + adapter), the adapter beside it in ``<out>/adapter``.
    """

    enabled: bool = Field(False, description="train a LoRA adapter on the frozen base instead of every weight")
    r: int = Field(8, ge=1, description="rank of the adapter's low-rank update B @ A")
    alpha: float = Field(16.0, gt=0, description="scale of the update: W + (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (0: deterministic)")
    target_modules: str = Field(
        "all-linear", description="comma-separated module names (q_proj,v_proj), or all-linear: every linear "
        "layer but the output head")


class OptimCfg(_Strict):
    """The optimiser section shared by ``finetune`` and ``method``; ``train.LoopCfg.from_optim`` turns it into a loop.

    Why a base class: the two stages had six copies of the same fields, and the loop
    config was assembled by hand from each; a knob added to one copy was easily missed
    in the other. The flat keys keep ``params.yaml`` unchanged.
    """

    epochs: Epochs
    batch_size: BatchSize
    lr: LearningRate
    weight_decay: WeightDecay = 0.0
    warmup_ratio: WarmupRatio = 0.0
    grad_accum: GradAccum = 1


# The memory knobs of both training stages (finetune, method): one definition, as for the optimiser's.
Lora = Annotated[LoraCfg, Field(default_factory=LoraCfg, description="LoRA adapter instead of full training (peft)")]
GradientCheckpointing = Annotated[bool, Field(
    description="recompute each layer's activations in the backward pass (less memory, more compute)")]
LossChunk = Annotated[int, Field(
    ge=0, description="positions per chunk of the log-softmax/cross-entropy (0: the whole sequence at once); a "
    "chunk's [B, chunk, V] float32 intermediates are recomputed in the backward pass")]


class FinetuneCfg(OptimCfg):
    """``finetune``: training the target and retain models (:func:`unlearn.stages.finetune`)."""

    epochs: Epochs = 12
    batch_size: BatchSize = 32
    lr: LearningRate = 3e-3
    weight_decay: WeightDecay = 0.01
    warmup_ratio: WarmupRatio = 0.1
    include_general: bool = Field(
        True, description="also train on the real_authors/world_facts-style sets (general knowledge, for utility)")
    lora: Lora
    gradient_checkpointing: GradientCheckpointing = False
    loss_chunk: LossChunk = 0


class DiPOCfg(_Strict):
    """``method.dipo``: DiPO's knobs (methods dipo and dipo_forget)."""

    k: int = Field(1, ge=1, description="memory set = the top-k reference tokens per answer position")
    gamma: float = Field(5.0, ge=0, description="logit shift that builds p+ (l - gamma) and p- (l + gamma)")
    beta: float = Field(0.1, gt=0, description="reward scale; the loss is -(2/beta) log sigmoid(Delta)")
    mask: Literal["topk", "gold"] = Field("topk", description="memory set: the top-k reference tokens, or the gold token")
    reference: Literal["fixed", "online"] = Field(
        "fixed", description="fixed: the frozen target (from the cache); online: the current model, detached")


class NPOCfg(_Strict):
    """``method.npo``: NPO's knobs (methods npo and npo_rt)."""

    beta: float = Field(0.1, gt=0, description="inverse temperature of the NPO loss")


class SimNPOCfg(_Strict):
    """``method.simnpo``: SimNPO's knobs (open-unlearning's convention)."""

    beta: float = Field(4.5, gt=0, description="inverse temperature of the length-normalised NPO loss")
    delta: float = Field(0.0, description="reward margin, inside the beta scaling (the paper's gamma = beta * delta)")
    forget_weight: float = Field(0.125, description="weight of the forget term (loss = forget_weight * SimNPO + alpha * retain)")


class DPOCfg(_Strict):
    """``method.dpo``: DPO's knobs (method dpo_idk: refusals preferred over the forget answers)."""

    beta: float = Field(0.1, gt=0, description="inverse temperature of the DPO loss")


class UndialCfg(_Strict):
    """``method.undial``: UNDIAL's knobs (self-distillation on a reference with the gold logit lowered)."""

    beta: float = Field(10.0, ge=0, description="how far the gold token's reference logit is lowered")


class MethodCfg(OptimCfg):
    """``method``: the unlearning method and its run (:func:`unlearn.stages.forget`)."""

    epochs: Epochs = 5
    batch_size: BatchSize = 16
    lr: LearningRate = 5e-4
    name: str = Field("dipo", description="dipo | dipo_forget | ga | graddiff | npo | npo_rt | simnpo | dpo_idk | undial")
    alpha: float = Field(1.0, ge=0, description="weight of the retain term (0: no retain pass)")
    retain_loss: Literal["nll", "kl"] = Field(
        "nll", description="retain term: NLL of the retain answers, or KL to the reference (kl needs cache.retain)")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: once per epoch)")
    lora: Lora
    gradient_checkpointing: GradientCheckpointing = False
    loss_chunk: LossChunk = 0
    eval_every: int = Field(
        0, ge=0, description="optimizer steps between evaluations on a fixed slice during training (0: none)")
    eval_rows: int = Field(16, ge=1, description="forget and retain rows in that slice (the first ones of each split)")
    select: Literal["last", "forget_prob_at_retain", "knowmem_at_retain"] = Field(
        "last", description="which model to keep: the last step, or the first evaluation whose forget probability "
        "(knowmem_at_retain, MUSE: KnowMem on the forget QA) on the slice is at or below the retain model's "
        "(needs eval_every; looks at the forget set)")
    dipo: DiPOCfg = Field(default_factory=DiPOCfg, description="DiPO (dipo, dipo_forget)")
    npo: NPOCfg = Field(default_factory=NPOCfg, description="NPO (npo, npo_rt)")
    simnpo: SimNPOCfg = Field(default_factory=SimNPOCfg, description="SimNPO (simnpo)")
    dpo: DPOCfg = Field(default_factory=DPOCfg, description="DPO on refusals (dpo_idk)")
    undial: UndialCfg = Field(default_factory=UndialCfg, description="UNDIAL (undial)")

    @model_validator(mode="after")
    def _select_needs_evaluations(self) -> "MethodCfg":
        if self.select != "last" and not self.eval_every:
            raise ValueError(f"select={self.select} picks among the evaluations during training: set eval_every > 0")
        return self


class CacheCfg(_Strict):
    """``cache``: the content-addressed reference tensors of the target model (:func:`unlearn.stages.cache`)."""

    dir: str = Field("cache", description="where the reference tensors are written (a DVC output)")
    top_k: int = Field(64, ge=1, description="reference log-probs kept per answer position (float16)")
    retain: bool = Field(False, description="also cache top-K on the retain split (needed by retain_loss: kl)")


class EvalCfg(_Strict):
    """``eval``: the TOFU evaluation (:func:`unlearn.stages.evaluate`)."""

    batch_size: int = Field(32, ge=1, description="rows per forward pass and per generation batch")
    max_new_tokens: int = Field(200, ge=1, description="greedy generation for ROUGE-L, stops at EOS")
    generation_examples: int | None = Field(None, description="cap on rows generated per split (null: all)")
    report_examples: int = Field(5, description="forget questions shown side by side in the report")
    parity: Literal["none", "open-unlearning"] = Field(
        "none", description=("open-unlearning: its joint tokenisation and first-token rule, the preset's open-unlearning "
                             "tags, its generation and ROUGE ground truth (to reproduce its published numbers); "
                             "none: this project's encoding (docs/evaluation.md lists the differences)"))


class MuseSyntheticCfg(_Strict):
    """``muse.synthetic``: the generator of fictitious MUSE-format news (``benchmark: muse``, ``data.source: synthetic``)."""

    articles_per_fold: int = Field(12, ge=2, description="articles in each of the four folds (fold1 is the forget set)")
    retain_articles: int = Field(12, ge=2, description="articles always trained on (privleak_retain; knowmem_retain_qa asks about them)")
    holdout_articles: int = Field(12, ge=2, description="articles never trained on (privleak_holdout, the non-members)")
    sentences_per_article: int = Field(8, ge=3, description="fact sentences per article")
    qa_per_article: int = Field(
        2, ge=1, description="questions in each article's opening Q&A box (the knowmem rows of fold1 / retain articles)")
    icl_examples: int = Field(0, ge=0, description="few-shot QA pairs prepended to every knowmem question (0: none; see muse_synthetic)")
    seed: int = Field(0, description="seed of the generator")


class MuseEvalCfg(_Strict):
    """``muse.eval``: MUSE's metrics (Shi et al. 2024), as the benchmark defines them."""

    verbmem_max_new_tokens: int = Field(128, ge=1, description="VerbMem: greedy continuation length; the truth is cut to as many tokens")
    knowmem_max_new_tokens: int = Field(32, ge=1, description="KnowMem: longest greedy answer (cut at a blank line or the next 'Question')")
    mink_k: float = Field(0.4, gt=0, le=1, description="Min-K% / Min-K%++: share of the lowest-scoring tokens averaged")
    privleak_attack: Literal["loss", "zlib", "min_k", "min_k++"] = Field(
        "min_k", description="the membership-inference score PrivLeak is computed from (MUSE: Min-K%)")
    examples: int | None = Field(None, ge=1, description="cap on rows per evaluation split (null: all)")


class MuseCfg(_Strict):
    """``muse``: what only the MUSE benchmark reads (``benchmark: muse``)."""

    synthetic: MuseSyntheticCfg = Field(default_factory=MuseSyntheticCfg, description="data.source=synthetic: the generator's knobs")
    max_articles: int | None = Field(
        None, ge=1, description="source=local/hub: keep the first N articles of each fold and of privleak_retain, and "
                                "only the evaluation rows found in the kept text (a CPU-sized run); null: everything")
    eval: MuseEvalCfg = Field(default_factory=MuseEvalCfg, description="MUSE's metrics")


class GateCfg(_NullMeansDefault):
    """``gate``: a model is registered only if it passes both thresholds (:func:`unlearn.tracking.gate_decision`)."""

    min_forget_quality: float = Field(0.05, ge=0, le=1, description="lowest forget quality (KS p-value against the retain model)")
    min_utility_ratio: float = Field(0.9, ge=0, description="model utility must be >= this ratio x the target model's")
    max_abs_privleak: float = Field(
        25.0, ge=0, description="MUSE: |PrivLeak| (percent, 0 = the retain model) must be at most this")


class MlflowCfg(_NullMeansDefault):
    """``tracking``: where MLflow runs and registered models go.

    :func:`unlearn.tracking.tracking_config` resolves it against the environment and the
    project directory into a :class:`unlearn.tracking.TrackingCfg`; the values here are
    what ``params.yaml`` says, before that resolution.
    """

    model_config = ConfigDict(coerce_numbers_to_str=True)  # as the untyped reader's str(value)

    uri: str | None = Field(None, description="tracking store (null: sqlite:///<project>/mlflow.db); MLFLOW_TRACKING_URI wins")
    experiment: str = Field("dipo-unlearn", description="MLflow experiment of the runs")
    registered_model: str = Field("unlearned-tofu", description="registered model that passing models become versions of")
    artifact_location: str | None = Field(
        None, description="artifact root of a new experiment (null: <project>/mlartifacts; relative: to the project)")


DEFAULT_LEDGER_PATH = "data/requests/ledger.db"
"""The ledger's SQLite file when ``requests.ledger_url`` is null (relative to the working directory)."""


class RequestGateCfg(_Strict):
    """``requests.gate``: what a model must show for each request it claims to honour when ``requests.oracle`` is
    ``none`` (no retain model): the request's rows must look like the holdout rows no model trained on
    (:mod:`unlearn.requests.evidence`). Utility is checked as ``gate.min_utility_ratio``."""

    min_ks_pvalue: float = Field(
        0.05, ge=0, le=1, description="one-sided KS-test p-value of 'the request's rows are known better than the holdout "
                               "rows' (truth ratios; answer probabilities where the holdout has no perturbed answers, "
                               "as TOFU's), at least")
    max_mia_auc_gap: float = Field(
        0.15, ge=0, le=0.5, description="membership AUC (loss and Min-K%++) of the request's rows vs the holdout rows "
                                        "at least 0.5 - this (0.5: indistinguishable; below: still look trained on)")
    max_prob_gap: float = Field(
        0.1, ge=0, le=1, description="mean answer probability of the request's rows minus the holdout rows', at most")
    max_rouge_gap: float = Field(
        0.2, ge=0, le=1, description="mean ROUGE-L recall of the request's rows minus the holdout rows', at most")


class RequestsCfg(_Strict):
    """``requests``: the deletion-request ledger and inbox (:mod:`unlearn.requests`), and the flow's schedule."""

    ledger_url: str | None = Field(None, description=f"any SQLAlchemy URL (null: sqlite:///{DEFAULT_LEDGER_PATH})")
    inbox: str = Field("data/requests/inbox", description="directory of *.jsonl deletion requests to ingest")
    schedule_cron: str = Field("*/30 * * * *", description="5-field cron schedule of the unlearn/requests deployment")
    max_attempts: int = Field(
        3, ge=1, description="a request whose model fails the gate this many times becomes needs_attention (not retried)")
    oracle: Literal["none", "retain"] = Field(
        "none", description="evidence per request: none = against the holdout rows (no retain model trained); "
                            "retain = a retain model trained per forget set (forget quality; benchmark runs)")
    mode: Literal["union", "sequential"] = Field(
        "union", description="union: unlearn every accepted request from the target; sequential: only the new "
                             "requests, from the champion that honours the earlier ones (needs oracle none)")
    gate: RequestGateCfg = Field(default_factory=RequestGateCfg, description="oracle none: the per-request evidence thresholds")

    @field_validator("schedule_cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("expected a 5-field cron expression, e.g. '*/30 * * * *'")
        return v

    @model_validator(mode="after")
    def _sequential_needs_holdout_evidence(self) -> RequestsCfg:
        if self.mode == "sequential" and self.oracle != "none":
            raise ValueError("requests.mode sequential needs requests.oracle none: a sequential model is re-checked "
                             "on every earlier request against the holdout, which the retain oracle does not do")
        return self

    @property
    def url(self) -> str:
        """``ledger_url``, or ``sqlite:///data/requests/ledger.db`` (relative to the working directory)."""
        return self.ledger_url or f"sqlite:///{DEFAULT_LEDGER_PATH}"


_NULL_IS_EMPTY = ("gate", "tracking", "requests")
"""Sections where ``section: null`` (every key commented out) means all defaults, as their untyped readers did."""


class Params(_Strict):
    """The whole of ``params.yaml``. Stages take the sections they read (``p.method``, ``p.gate``...)."""

    benchmark: Literal["tofu", "muse"] = Field("tofu", description="the benchmark whose data, metrics and gate the pipeline runs")
    seed: int = Field(0, description="seed of training order, initialisation and IdK answer choice")
    reports_dir: str = Field("reports", description="metrics, loss logs, evaluation reports (DVC metrics/plots)")
    data: DataCfg = Field(default_factory=DataCfg, description="where the QA rows come from and where the splits go")
    model: ModelCfg = Field(default_factory=ModelCfg, description="the model, its tokenizer and where trained models go")
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg, description="training the target and retain models")
    method: MethodCfg = Field(default_factory=MethodCfg, description="the unlearning method and its run")
    cache: CacheCfg = Field(default_factory=CacheCfg, description="reference tensors of the target model")
    eval: EvalCfg = Field(default_factory=EvalCfg, description="the evaluation (batching, generation, report)")
    muse: MuseCfg = Field(default_factory=MuseCfg, description="MUSE's generator and metrics (benchmark: muse)")
    gate: GateCfg = Field(default_factory=GateCfg, description="thresholds a model must pass to be registered")
    tracking: MlflowCfg = Field(default_factory=MlflowCfg, description="MLflow store, experiment and registered model")
    requests: RequestsCfg = Field(default_factory=RequestsCfg, description="deletion-request ledger, inbox and schedule")

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        """``gate: null`` / ``tracking: null`` / ``requests: null`` (an empty YAML section) mean all defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in _NULL_IS_EMPTY:
            if name in data and data[name] is None:
                data[name] = {}
        return data

    @model_validator(mode="after")
    def _select_rule_fits_benchmark(self) -> "Params":
        allowed = SELECT_BENCHMARKS.get(self.method.select)
        if allowed and self.benchmark not in allowed:
            raise ValueError(f"method.select={self.method.select} needs benchmark {' or '.join(allowed)} (its "
                             f"statistic is not measured on {self.benchmark}); use forget_prob_at_retain")
        return self


SELECT_BENCHMARKS: dict[str, tuple[str, ...]] = {"knowmem_at_retain": ("muse",)}
"""``method.select`` rules that need a benchmark's own statistic (:mod:`unlearn.methods.selection`); the others
run on any benchmark."""


class ConfigError(UserError):
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


KNOWN_SECTIONS = frozenset(Params.model_fields)
"""Every top-level key of ``params.yaml``; anything else is an error."""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The section class at dotted location ``loc`` (``()`` is :class:`Params`), or None if ``loc`` is no section."""
    model: type[BaseModel] = Params
    for name in loc:
        field = model.model_fields.get(name)
        if field is None or not _is_section(field.annotation):
            return None
        model = field.annotation
    return model


def _error_line(err: Any) -> str:
    """One line per pydantic error, led by the dotted key; an unknown key lists the keys its section has."""
    loc = tuple(str(part) for part in err["loc"])
    key = ".".join(loc) or "(top level)"
    section = _section_at(loc[:-1]) if err["type"] == "extra_forbidden" else None
    if section is None:
        return f"  {key}: {err['msg']} (got {err.get('input')!r})"
    known = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    hint = f"; did you mean {'.'.join((*loc[:-1], close[0]))}?" if close else ""
    what = "unknown section" if len(loc) == 1 else "unknown key"
    return f"  {key}: {what}{hint} (expected one of: {', '.join(known)})"


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing file -> defaults), apply overrides, validate every section."""
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
    try:
        return Params(**raw)
    except ValidationError as e:
        lines = [_error_line(err) for err in e.errors()]
        raise ConfigError(f"{path}: invalid parameters\n" + "\n".join(lines)) from None


# --------------------------------------------------------------------------- the knob reference
@dataclass(frozen=True)
class Knob:
    """One leaf of ``params.yaml``: a row of ``unlearn params`` and of ``docs/params.md``."""

    name: str  # dotted, as in --set
    type: str  # e.g. "int (>= 1)", "synthetic | local | hub", "str | null"
    default: Any  # the code's default
    value: Any  # the value in the Params it was read from (params.yaml + --set)
    description: str


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if origin is Union or origin is types.UnionType:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _field_type(field: Any) -> str:
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata
              for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if getattr(m, attr, None) is not None]
    name = _type_name(field.annotation)
    return f"{name} ({', '.join(bounds)})" if bounds else name


def knobs(p: Params | None = None) -> list[Knob]:
    """Every leaf knob, in ``params.yaml`` order, with its value in ``p`` (default: all defaults)."""
    out: list[Knob] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if _is_section(field.annotation):
                walk(value, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                out.append(Knob(prefix + name, _field_type(field), default, value, field.description or ""))

    walk(Params() if p is None else p, "")
    return out


def select_knobs(all_knobs: list[Knob], names: list[str] | None) -> list[Knob]:
    """The knobs named by ``names`` (a knob, or a section such as ``method.dipo``); all of them if none is given."""
    if not names:
        return all_knobs
    picked = [k for k in all_knobs if any(k.name == n or k.name.startswith(n + ".") for n in names)]
    unknown = [n for n in names if not any(k.name == n or k.name.startswith(n + ".") for k in all_knobs)]
    if unknown:
        raise ConfigError(f"no such knob or section: {', '.join(unknown)} (`unlearn params` lists them all)")
    return picked


def format_value(v: Any) -> str:
    """``v`` as it would be written in ``params.yaml`` or after ``--set key=`` (null, true, 0.003, "*/30 * * * *")."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    try:
        plain = s != "" and s.strip() == s and yaml.safe_load(s) == s
    except yaml.YAMLError:
        plain = False
    return s if plain else json.dumps(s)


def knobs_table(rows: list[Knob]) -> str:
    """Plain-text table, one knob per line (so ``unlearn params | grep lr`` works)."""
    header = ("knob", "type", "default", "value", "description")
    cells = [header] + [(k.name, k.type, format_value(k.default), format_value(k.value), k.description) for k in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(line.rstrip() for line in lines)


def _md(text: str) -> str:
    """Escape a table cell: ``|`` ends the cell even inside a code span."""
    return text.replace("|", r"\|")


def _md_text(text: str) -> str:
    """Escape prose for a table cell: ``<project>`` would vanish as an HTML tag, ``*.jsonl`` would start emphasis."""
    for ch in ("\\", "*", "<"):
        text = text.replace(ch, "\\" + ch)
    return _md(text)


def params_markdown(p: Params, rows: list[Knob] | None = None, source: str = "params.yaml") -> str:
    """The Markdown reference of every knob, one table per section; ``docs/params.md`` is this for ``params.yaml``."""
    rows = knobs(p) if rows is None else rows
    out = [
        "# Parameters",
        "",
        "<!-- Generated by `unlearn params --markdown > docs/params.md` from src/unlearn/config.py and params.yaml;",
        "     do not edit by hand: tests/test_config.py fails when this file is out of date. -->",
        "",
        "Every knob of `params.yaml`: its type (and bounds), the code's default, the value in "
        f"`{source}` and what it does. Override any of them per command with `--set key=value` (per DVC "
        "experiment with `dvc exp run -S key=value`); `unlearn params [--params FILE] [--set ...] [KNOB...]` "
        "prints this list with the values those give. An unknown key or section is an error that names it.",
    ]
    groups: dict[str, list[Knob]] = {}
    for k in rows:
        section, _, rest = k.name.partition(".")
        groups.setdefault(section if rest else "", []).append(k)
    for section, ks in groups.items():
        title = "## Top level" if not section else f"## `{section}`: {Params.model_fields[section].description}"
        out += ["", title, "", f"| knob | type | default | `{_md(source)}` | description |", "|---|---|---|---|---|"]
        out += [f"| `{k.name}` | `{_md(k.type)}` | `{_md(format_value(k.default))}` | `{_md(format_value(k.value))}` | "
                f"{_md_text(k.description)} |" for k in ks]
    return "\n".join(out) + "\n"
