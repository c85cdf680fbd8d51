"""The one training loop, for fine-tuning and for unlearning alike.

It knows nothing of which loss it minimises: it is handed a ``step_loss``
callable (model, batch) -> (loss, logs). Devices and mixed precision come from
``accelerate``; the data order, the split of every batch over the ranks, gradient
accumulation and the learning-rate schedule are owned here, so that a run gives
the same result whatever the launcher and the number of processes:

* **One global batch per optimizer step.** ``batch_size`` is per rank (and per
  micro-batch): an optimizer step consumes ``batch_size * world * grad_accum``
  rows of one seeded permutation of the data, the same rows whether one
  process takes them all or two ranks take half each. Every row is seen exactly
  once per epoch (no wrap-around padding of uneven shards), checked inside the
  run on every epoch.
* **Exact reduction.** ``step_loss`` returns this rank's *share* of the loss of
  the whole step: every labelled batch part carries the global denominators
  (``n_rows``: rows of the part over all ranks and micro-batches of the step;
  ``n_tokens``: their answer tokens) and the losses divide by those instead of
  by local counts. Shares add up to the loss one process computes on the whole
  step, so DDP's gradient mean (times ``world``) and gradient accumulation give
  that same gradient, up to floating-point summation order.
* **One scheduler step per optimizer step**, counted from the global batch, so
  warm-up and decay take the same number of updates on any number of ranks.
* **Resumable, and only by the same run.** Checkpoints are
  ``accelerator.save_state`` snapshots plus a JSON with the position in the data
  and a fingerprint of everything that defines the run; a checkpoint of another
  run (another method, lr, seed, data, world size...) is discarded with a message
  naming what changed. The swap to a new checkpoint is crash-safe: a complete
  copy exists at every instant. Frozen parameters (the base of a LoRA model) are
  not in a checkpoint: the stage rebuilds them from the starting model, so a
  LoRA checkpoint holds the adapter, its optimiser state and the loop's state.
* **Evaluation during training** (``evaluate`` + ``cfg.eval_every``): every
  ``eval_every`` optimizer steps and after the last one, ``evaluate(model)`` runs
  in eval mode without gradients on every rank; its values join that step's log
  entry as ``eval_<name>``. ``stop(history)`` ends the run after an evaluation
  (the stage's checkpoint-selection rule: the first step that satisfies it).
* **Memory**: ``cfg.gradient_checkpointing`` recomputes the layers' activations
  in the backward pass; a model already sharded with torch's FSDP2
  (``fully_shard``) is trained as it is (only the optimiser is prepared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .config import OptimCfg
from .io import stable_hash

log = logging.getLogger("unlearn.train")

IGNORE = -100  # label of positions without a loss (the Hugging Face convention; models.formatting uses it too)

StepLoss = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopCfg:
    epochs: int
    batch_size: int  # rows per rank per micro-batch
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # optimizer steps; 0 = once per epoch
    mixed_precision: str = "auto"  # auto -> bf16 on a GPU, no on a CPU
    desc: str = "train"
    lora: dict | None = None  # the adapter's settings (the stage wraps the model; here for the fingerprint)
    gradient_checkpointing: bool = False
    loss_chunk: int = 0  # positions per log-softmax chunk (step_loss applies it; here for the fingerprint)
    eval_every: int = 0  # optimizer steps between evaluations (with train_loop's ``evaluate``); 0 = none

    @classmethod
    def from_optim(cls, optim: OptimCfg, *, seed: int, desc: str, **loop: Any) -> LoopCfg:
        """The loop of a ``finetune:`` or ``method:`` section: its optimiser knobs plus the run's seed and label.

        Why one constructor: fine-tuning and unlearning each copied the optimiser
        fields by hand, so a knob added to :class:`unlearn.config.OptimCfg` could be
        silently ignored by one stage. Every ``OptimCfg`` field is passed here, so a field
        ``LoopCfg`` lacks is a ``TypeError``, not a dropped setting. ``loop`` sets the
        loop-only fields (``checkpoint_every``, ``max_grad_norm``, ``mixed_precision``).
        """
        return cls(**{name: getattr(optim, name) for name in OptimCfg.model_fields}, seed=seed, desc=desc, **loop)

    @classmethod
    def for_stage(cls, section, *, seed: int, desc: str, **loop: Any) -> LoopCfg:
        """:meth:`from_optim` plus the section's memory knobs (``lora``, ``gradient_checkpointing``,
        ``loss_chunk``: ``finetune`` and ``method`` both have them), so that they are in the run's fingerprint."""
        return cls.from_optim(section, seed=seed, desc=desc, lora=section.lora.model_dump(),
                              gradient_checkpointing=section.gradient_checkpointing, loss_chunk=section.loss_chunk,
                              **loop)


# --------------------------------------------------------------------------- distributed state
def distributed_state():
    """The process's one ``PartialState``, created with ``cpu=True`` when there is no GPU.

    On a CPU machine the *first* ``PartialState``/``Accelerator`` made in a process
    fixes the distributed state for every later one, and one made without
    ``cpu=True`` under ``accelerate launch --multi_gpu`` reports a world of 1 on every
    rank (each rank then trains alone on all the data and all write the same
    output). Everything here that asks "which rank am I" goes through this
    function, and the CLI calls it before any stage runs.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on rank 0 (or without distributed training): only it writes models and reports."""
    return distributed_state().is_main_process


def main_process_first():
    """Context manager: rank 0 runs the block first (e.g. builds a missing cache), the others after it."""
    return distributed_state().main_process_first()


def make_accelerator(cfg: LoopCfg | None = None, mixed_precision: str | None = None):
    """The ``Accelerator`` every stage trains with (after :func:`distributed_state`, so the ranks are right)."""
    from accelerate import Accelerator

    distributed_state()
    from .precision import resolve_precision

    mp = resolve_precision(None, mixed_precision or (cfg.mixed_precision if cfg else "auto")).mixed_precision
    # Gradient accumulation is done by train_loop itself (exact global denominators), not by accelerate.
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


# --------------------------------------------------------------------------- data order and sharding
def epoch_steps(n: int, batch_size: int, world: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of micro-batches of global row indices (before sharding).

    One seeded permutation per epoch, cut into steps of ``batch_size * world * grad_accum``
    rows and each step into micro-batches of ``batch_size * world``. Only the seed,
    the epoch and the global batch size decide it, so 1 process x batch 16 and
    2 ranks x batch 8 walk the same rows in the same steps.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    micro, step = batch_size * world, batch_size * world * grad_accum
    return [[perm[j:j + micro] for j in range(i, min(i + step, n), micro)] for i in range(0, n, step)]


def shard(rows: list[int], world: int, rank: int) -> list[int]:
    """This rank's contiguous, near-equal part of a micro-batch (sizes differ by at most one; may be empty)."""
    q, r = divmod(len(rows), world)
    start = rank * q + min(rank, r)
    return rows[start:start + q + (1 if rank < r else 0)]


def steps_per_epoch(n: int, batch_size: int, world: int, grad_accum: int) -> int:
    return math.ceil(n / (batch_size * world * grad_accum))


def _labelled_parts(batch: dict) -> dict[str, dict]:
    """The batch parts that carry ``labels``: the batch itself, or its sub-dicts (forget, retain, idk)."""
    if "labels" in batch:
        return {"": batch}
    return {k: v for k, v in sorted(batch.items()) if isinstance(v, dict) and "labels" in v}


def _local_counts(batch: dict) -> list[float]:
    out: list[float] = []
    for part in _labelled_parts(batch).values():
        lb = part["labels"]
        out += [float(lb.size(0)), float((lb[:, 1:] != IGNORE).sum())]
    return out


def _attach_denominators(batch: dict, totals: list[float]) -> None:
    for i, part in enumerate(_labelled_parts(batch).values()):
        part["n_rows"], part["n_tokens"] = totals[2 * i], totals[2 * i + 1]


# --------------------------------------------------------------------------- schedule
def lr_schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``step`` (0-based): linear warm-up, then linear decay to 0 at ``total``."""
    warm = int(round(total * warmup_ratio))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if total <= warm:
            return 1.0
        return max(0.0, (total - step) / (total - warm))

    return f


# --------------------------------------------------------------------------- checkpoints
def run_fingerprint(cfg: LoopCfg, n_examples: int, world: int, run_key: dict | None) -> dict[str, Any]:
    """Everything that defines a run's trajectory; a checkpoint only resumes a run with the same fingerprint."""
    loop = {k: v for k, v in asdict(cfg).items() if k not in ("desc", "checkpoint_every", "eval_every")}
    return {"loop": loop, "n_examples": n_examples, "world_size": world, "run": run_key or {}}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_changes(old: dict, new: dict, limit: int = 6) -> list[str]:
    """Readable differences between two fingerprints, e.g. ``run.method.name: npo -> dipo``."""
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in keys if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _siblings(ckpt: Path) -> tuple[Path, Path]:
    return ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")


def _complete(d: Path) -> bool:
    return (d / "loop_state.json").exists()  # written last: its presence marks a complete snapshot


def recover_checkpoint(ckpt: Path) -> None:
    """After a crash mid-swap, put the newest complete snapshot back at ``ckpt`` (main process only)."""
    tmp, old = _siblings(ckpt)
    if _complete(ckpt):
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(ckpt, ignore_errors=True)
    for cand in (tmp, old):  # tmp is newer than old when both are complete
        if _complete(cand):
            cand.rename(ckpt)
            break
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def swap_in(tmp: Path, ckpt: Path) -> None:
    """Replace ``ckpt`` by the complete snapshot ``tmp`` so that a complete copy exists at every instant."""
    _, old = _siblings(ckpt)
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the loop
def train_loop(
    model: torch.nn.Module,
    n_examples: int,
    collate: Callable[[list[int], int], dict],
    step_loss: StepLoss,
    cfg: LoopCfg,
    checkpoint_dir: str | Path | None = None,
    accelerator=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    run_key: dict | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    stop: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Minimise ``step_loss`` over ``cfg.epochs`` passes of ``n_examples`` examples.

    ``collate(indices, epoch)`` builds this rank's part of a micro-batch (dicts of
    CPU tensors; moved to the device here). ``step_loss`` must divide by the
    global denominators ``n_rows`` / ``n_tokens`` found in each labelled part (see
    the module docstring); without them it would still train, but the result
    would depend on how the batch was split.

    Returns the per-step log: step, epoch, the lr the step used, the global rows
    of the step, and every value ``step_loss`` reports, summed over ranks and
    micro-batches (so each is the value of the whole step). The last entry of each
    epoch also holds ``shard_rows`` (rows each rank took that epoch) and
    ``rows_seen`` (distinct rows over all ranks), verified to cover the data once.

    With ``checkpoint_dir``, state is saved once per epoch (and every
    ``checkpoint_every`` steps); a checkpoint of the same run (``run_key`` and the
    loop settings) is resumed, any other is discarded with the reason.

    With ``evaluate`` and ``cfg.eval_every``, see the module docstring; ``stop``
    is asked after each evaluation and ends the run when it returns True.
    """
    from accelerate.utils import send_to_device, set_seed

    set_seed(cfg.seed)
    acc = accelerator or make_accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    if cfg.gradient_checkpointing:
        from .models.lora import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    per_epoch = steps_per_epoch(n_examples, cfg.batch_size, world, cfg.grad_accum)
    total = max(1, per_epoch * cfg.epochs)
    # Not passed to acc.prepare: accelerate would step it once per process per optimizer step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, cfg.warmup_ratio))
    sharded = _is_fsdp2(model)
    if sharded:  # torch's FSDP2 already shards it (and reduce-scatters its gradients): no DDP wrapper on top
        if checkpoint_dir:
            raise ValueError("checkpoints of a model sharded with torch's fully_shard are not supported: train "
                             "without checkpoint_dir, or shard through accelerate's FSDP plugin (configs/)")
        opt = acc.prepare(opt)
    else:
        model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    frozen = any(not p.requires_grad for p in model.parameters())
    hook = acc.register_save_state_pre_hook(_keep_trainable) if frozen else None

    fingerprint = run_fingerprint(cfg, n_examples, world, run_key)
    state: dict[str, Any] = {"epoch": 0, "steps_done": 0, "step": 0}
    history: list[dict[str, Any]] = []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt:
        if acc.is_main_process:
            recover_checkpoint(ckpt)
        acc.wait_for_everyone()
        if _complete(ckpt):
            saved = json.loads((ckpt / "loop_state.json").read_text())
            if saved.get("fingerprint") == fingerprint:
                # Frozen parameters are not in the checkpoint (_keep_trainable): they are the starting weights.
                acc.load_state(str(ckpt / "state"), strict=not frozen)
                state = {k: saved[k] for k in ("epoch", "steps_done", "step")}
                history = json.loads((ckpt / "log.json").read_text())
                acc.print(f"resuming {cfg.desc} from {ckpt}: epoch {state['epoch']}, step {state['step']} of {total}")
            else:
                why = "; ".join(fingerprint_changes(saved.get("fingerprint") or {}, fingerprint)) or "unknown format"
                acc.print(f"{cfg.desc}: the checkpoint in {ckpt} belongs to another run ({why}): starting fresh")
                acc.wait_for_everyone()
                if acc.is_main_process:
                    shutil.rmtree(ckpt, ignore_errors=True)
                acc.wait_for_everyone()

    def save_checkpoint() -> None:
        if not ckpt:
            return
        tmp, _ = _siblings(ckpt)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()  # every rank writes its RNG state into tmp/state
        acc.save_state(str(tmp / "state"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "log.json").write_text(json.dumps(history))
            (tmp / "loop_state.json").write_text(json.dumps(dict(state, fingerprint=fingerprint)))
            swap_in(tmp, ckpt)
        acc.wait_for_everyone()

    model.train()
    bar = tqdm(total=total, initial=state["step"], desc=cfg.desc, unit="step",
               disable=not acc.is_local_main_process or bool(os.environ.get("TQDM_DISABLE")))  # study workers: none
    stopped = False
    for epoch in range(state["epoch"], cfg.epochs):
        steps = epoch_steps(n_examples, cfg.batch_size, world, cfg.grad_accum, cfg.seed, epoch)
        first = state["steps_done"] if epoch == state["epoch"] else 0
        taken: list[int] = []
        for s_idx in range(first, len(steps)):
            entry = _one_step(acc, model, opt, sched, steps[s_idx], collate, step_loss, cfg, epoch, send_to_device,
                              taken)
            state["step"] += 1
            entry = {"step": state["step"], **entry}
            if s_idx == len(steps) - 1:
                expected = sorted(i for s in steps[first:] for mb in s for i in mb)
                entry.update(_check_partition(acc, taken, expected, epoch))
            evaluated = evaluate is not None and cfg.eval_every > 0 and (
                state["step"] % cfg.eval_every == 0 or state["step"] == total)
            if evaluated:
                entry.update({f"eval_{k}": v for k, v in _evaluate(acc, model, evaluate).items()})
            history.append(entry)
            if on_log:
                on_log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            state.update(epoch=epoch, steps_done=s_idx + 1)
            if evaluated and stop is not None and _agree(acc, bool(stop(history))):
                acc.print(f"{cfg.desc}: stopping after step {state['step']} of {total}: the selection rule picked it")
                stopped = True
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint()
        if stopped:
            break
        state.update(epoch=epoch + 1, steps_done=0)
        save_checkpoint()
    bar.close()
    acc.wait_for_everyone()
    if hook is not None:
        hook.remove()
    model = acc.unwrap_model(model)
    model.eval()
    return history


def _is_fsdp2(model) -> bool:
    """True for a model sharded with torch's FSDP2 ``fully_shard`` (its parameters are DTensor shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def fsdp2_shard(model, mesh=None):
    """Shard ``model`` in place with torch's FSDP2 ``fully_shard`` over every rank: each decoder layer is its
    own unit (gathered for its forward and backward, then freed), the root holds the rest (embeddings, norm,
    head). Call it on every rank after :func:`distributed_state` (gloo on CPUs, NCCL on GPUs), before
    :func:`train_loop`, which then trains the sharded model as it is. Returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    st = distributed_state()
    mesh = mesh or init_device_mesh(st.device.type, (st.num_processes,))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(acc, model) -> bool:
    """True when no rank holds the whole model: torch FSDP2, or accelerate's FSDP / DeepSpeed plugins."""
    from accelerate.utils import DistributedType

    return _is_fsdp2(model) or acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def consolidate(acc, model, rebuild: Callable[[], torch.nn.Module]):
    """The trained model whole, on the main process (``None`` on the others): every rank must call it.

    Unsharded (one process, DDP): ``model`` itself. Sharded: the full state dict is gathered (a collective)
    and loaded into ``rebuild()``, a fresh model of the same structure (for LoRA: wrapped the same way).
    """
    if not is_sharded(acc, model):
        return model
    if _is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # accelerate's FSDP / DeepSpeed plugin: it gathers the prepared model
        state = acc.get_state_dict(acc._models[0] if acc._models else model)
    if not acc.is_main_process:
        return None
    whole = rebuild()
    whole.load_state_dict(state)
    whole.eval()
    return whole


def _keep_trainable(models, weights, output_dir) -> None:
    """``save_state`` pre-hook: keep only the parameters that train (a LoRA model's adapter) in each state dict."""
    for i, model in enumerate(models):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in names}


def _evaluate(acc, model, evaluate) -> dict[str, float]:
    """``evaluate`` on the unwrapped model, in eval mode, without gradients; back in training mode after."""
    inner = acc.unwrap_model(model)
    inner.eval()
    try:
        with torch.no_grad():
            values = {k: float(v) for k, v in evaluate(inner).items()}
    finally:
        model.train()
    return values


def _agree(acc, decision: bool) -> bool:
    """Rank 0's decision, on every rank (the ranks evaluate the same weights; this makes sure they stop together)."""
    if acc.num_processes == 1:
        return decision
    import torch.distributed as dist

    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _one_step(acc, model, opt, sched, micro_batches, collate, step_loss, cfg: LoopCfg, epoch: int, to_device,
              taken: list[int]):
    """One optimizer step over the global rows ``micro_batches``; returns the step's log entry.

    The rows this rank really collated are appended to ``taken`` (checked at the end of the epoch).
    """
    world, rank = acc.num_processes, acc.process_index
    parts = []
    for mb in micro_batches:
        rows = shard(mb, world, rank)
        taken.extend(rows)
        # A rank with no row in a short final micro-batch still runs forward/backward (DDP needs every rank's
        # gradients) on a stand-in row whose loss is multiplied by 0 and whose counts are left out.
        batch = collate(rows or mb[:1], epoch)
        parts.append((batch, 1.0 if rows else 0.0))
    counts = torch.zeros(len(_local_counts(parts[0][0])), dtype=torch.float64)
    for batch, weight in parts:
        counts += weight * torch.tensor(_local_counts(batch), dtype=torch.float64)
    totals = acc.reduce(counts.to(acc.device), "sum").tolist() if world > 1 else counts.tolist()
    lr = opt.param_groups[0]["lr"]
    logs_sum: dict[str, float] = {}
    for i, (batch, weight) in enumerate(parts):
        _attach_denominators(batch, totals)
        batch = to_device(batch, acc.device)
        sync = contextlib.nullcontext() if i == len(parts) - 1 else acc.no_sync(model)
        with sync:
            loss, logs = step_loss(model, batch)
            # DDP averages gradients over ranks; the shares must be summed, hence * world.
            acc.backward(loss * (weight * world))
        logs = dict(logs)
        logs.setdefault("loss", float(loss.detach()))
        for k, v in logs.items():
            logs_sum[k] = logs_sum.get(k, 0.0) + weight * float(v)
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad()
    keys = sorted(logs_sum)
    vals = torch.tensor([logs_sum[k] for k in keys], dtype=torch.float64)
    if world > 1:
        vals = acc.reduce(vals.to(acc.device), "sum").cpu()
    entry: dict[str, Any] = {"epoch": epoch, "lr": lr, "rows": sum(len(mb) for mb in micro_batches)}
    entry.update({k: float(v) for k, v in zip(keys, vals.tolist())})
    return entry


def _check_partition(acc, taken: list[int], expected: list[int], epoch: int) -> dict[str, Any]:
    """Assert, inside the run, that the rows the ranks collated this epoch are disjoint and cover the data once.

    Returns ``shard_rows`` (rows per rank) and ``rows_seen`` (distinct rows over all ranks) for the log.
    """
    if acc.num_processes == 1:
        gathered = [taken]
    else:
        import torch.distributed as dist

        gathered = [None] * acc.num_processes
        dist.all_gather_object(gathered, taken)
    everything = [i for part in gathered for i in (part or [])]
    if sorted(everything) != expected:
        dup = len(everything) - len(set(everything))
        raise RuntimeError(
            f"data sharding is wrong in epoch {epoch}: {len(everything)} rows taken by {acc.num_processes} rank(s), "
            f"{dup} taken twice, {len(set(expected) - set(everything))} missing (expected {len(expected)} rows, "
            "each exactly once)"
        )
    return {"shard_rows": [len(part or []) for part in gathered], "rows_seen": len(set(everything))}
