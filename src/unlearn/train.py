"""The one training loop, for fine-tuning and for unlearning alike.

It knows nothing of which loss it minimises: it is handed a ``step_loss``
callable (model, batch) -> (loss, logs). Devices, data-parallel sharding,
mixed precision and gradient accumulation come from ``accelerate``; checkpoints
are ``accelerator.save_state`` snapshots plus a small JSON with the position in
the data, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

StepLoss = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopCfg:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # optimizer steps; 0 = once per epoch
    mixed_precision: str = "auto"  # auto -> bf16 on a GPU, no on a CPU
    desc: str = "train"


class EpochDataset(Dataset):
    """Indices 0..n-1; the collate function turns a list of indices into a batch.

    ``set_epoch`` lets the collate pair forget rows with a fresh retain sample
    every epoch while staying deterministic.
    """

    def __init__(self, n: int):
        self.n = n
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def make_accelerator(cfg: LoopCfg, cpu: bool | None = None):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Without a GPU, cpu=True is what makes `accelerate launch --multi_gpu --num_processes N`
    # (or torchrun) start N gloo ranks on the CPU; otherwise accelerate silently runs one.
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp, cpu=cpu)


def is_main_process() -> bool:
    """True on rank 0 (or without distributed training): only it writes models and reports."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = int(round(total * warmup_ratio))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if total <= warm:
            return 1.0
        return max(0.0, (total - step) / (total - warm))

    return f


def train_loop(
    model: torch.nn.Module,
    n_examples: int,
    collate: Callable[[list[int], int], dict],
    step_loss: StepLoss,
    cfg: LoopCfg,
    checkpoint_dir: str | Path | None = None,
    accelerator=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Minimise ``step_loss`` over ``cfg.epochs`` passes of ``n_examples`` examples.

    ``collate(indices, epoch)`` builds a batch (dicts of CPU tensors; accelerate
    moves them). Returns the per-step log (step, epoch, lr, loss and whatever the
    loss reports). With ``checkpoint_dir``, state is saved once per epoch (and
    every ``checkpoint_every`` steps) and an existing checkpoint is resumed.
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    acc = accelerator or make_accelerator(cfg)
    ds = EpochDataset(n_examples)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=True, generator=gen, collate_fn=lambda idx: collate(idx, ds.epoch)
    )
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / acc.num_processes / cfg.grad_accum)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)

    state = {"epoch": 0, "batches_done": 0, "step": 0}
    log: list[dict[str, Any]] = []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and (ckpt / "loop_state.json").exists():
        acc.load_state(str(ckpt / "state"))
        state = json.loads((ckpt / "loop_state.json").read_text())
        log_file = ckpt / "log.json"
        log = json.loads(log_file.read_text()) if log_file.exists() else []
        acc.print(f"resuming {cfg.desc} from epoch {state['epoch']}, batch {state['batches_done']}")

    def save_checkpoint() -> None:
        if not ckpt:
            return
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(ckpt.with_name(ckpt.name + ".tmp") / "state"))
        if acc.is_main_process:
            (tmp / "loop_state.json").write_text(json.dumps(state))
            (tmp / "log.json").write_text(json.dumps(log))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
        acc.wait_for_everyone()

    model.train()
    bar = tqdm(total=total, initial=state["step"], desc=cfg.desc, disable=not acc.is_local_main_process, unit="step")
    for epoch in range(state["epoch"], cfg.epochs):
        ds.set_epoch(epoch)
        # The shuffle order must be the same on resume: reseed per epoch.
        gen.manual_seed(cfg.seed + epoch)
        it = loader
        if epoch == state["epoch"] and state["batches_done"]:
            it = acc.skip_first_batches(loader, state["batches_done"])
        batches_done = state["batches_done"] if epoch == state["epoch"] else 0
        for batch in it:
            with acc.accumulate(model):
                loss, logs = step_loss(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
            batches_done += 1
            if acc.sync_gradients:
                state["step"] += 1
                entry = {"step": state["step"], "epoch": epoch, "lr": sched.get_last_lr()[0]}
                entry.update({k: float(v) for k, v in logs.items()})
                # Under data parallelism, log the mean over ranks, not rank 0's own batch.
                entry["loss"] = float(acc.gather(loss.detach().reshape(1)).mean()) if acc.num_processes > 1 \
                    else entry.get("loss", float(loss.detach()))
                log.append(entry)
                if on_log:
                    on_log(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                state.update(epoch=epoch, batches_done=batches_done)
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    save_checkpoint()
        state.update(epoch=epoch + 1, batches_done=0)
        save_checkpoint()
    bar.close()
    acc.wait_for_everyone()
    model = acc.unwrap_model(model)
    model.eval()
    return log
