"""Data-parallel training really runs on several ranks (CPU, gloo) and keeps them in sync.

``accelerate launch --num_processes 2 --cpu`` silently starts ONE process on
this accelerate version; two gloo ranks come from ``--multi_gpu`` together with
``Accelerator(cpu=True)``, which :func:`unlearn.train.make_accelerator` sets when
there is no GPU. ``torchrun --nproc_per_node 2`` is checked the same way.

Each rank of a tiny script (tiny tokenizer + tiny Llama, a few steps of
:func:`unlearn.train.train_loop` on a fixed batch function) writes its rank,
world size, loss log and a checksum of its final weights; the test asserts two
distinct ranks of a world of two, bitwise-identical weights and a falling loss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 120

SCRIPT = textwrap.dedent(
    '''
    import hashlib, json, os, sys
    from pathlib import Path

    import torch

    from unlearn.config import ArchCfg
    from unlearn.models.build import build_model, train_tokenizer
    from unlearn.models.formatting import collate, encode_many
    from unlearn.models.scoring import mean_nll
    from unlearn.train import LoopCfg, train_loop

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    questions = [f"What is fact number {i} about author {i % 5}?" for i in range(16)]
    answers = [f"Author {i % 5} wrote book {i} in the year {1900 + 7 * i}." for i in range(16)]
    tok = train_tokenizer([q + " " + a for q, a in zip(questions, answers)] * 4, 300)
    arch = ArchCfg(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    model = build_model(arch, tok, seed=0)  # same seed: identical initial weights on every rank
    enc = encode_many(tok, questions, answers, 48)
    cfg = LoopCfg(epochs=6, batch_size=4, lr=3e-3, warmup_ratio=0.25, seed=0, desc="ddp test")

    def step_loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return mean_nll(logits, batch["labels"]), {}

    seen = []

    def make_batch(idx, epoch):
        seen.append([int(i) for i in idx])
        return collate([enc[i] for i in idx], tok.pad_token_id)

    log = train_loop(model, len(enc), make_batch, step_loss, cfg)
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    from accelerate import PartialState

    st = PartialState()
    rec = {
        "rank": st.process_index, "world": st.num_processes, "env_rank": os.environ.get("RANK"),
        "env_world": os.environ.get("WORLD_SIZE"), "device": str(st.device), "backend": str(st.backend),
        "checksum": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "losses": [e["loss"] for e in log],
        "steps": len(log), "seen": seen, "lrs": [e["lr"] for e in log],
    }
    (out / f"rank{st.process_index}.json").write_text(json.dumps(rec))
    '''
)


def _bin(name: str) -> str | None:
    """The console script next to this interpreter (the venv's), else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=out)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s:\n{(e.stderr or '')[-3000:]}")
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    files = sorted(out.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def _check(recs: list[dict]) -> None:
    assert len(recs) == 2, f"expected one result file per rank (2), got {len(recs)}: {[r['rank'] for r in recs]}"
    assert sorted(r["rank"] for r in recs) == [0, 1]
    assert all(r["world"] == 2 for r in recs), [(r["rank"], r["world"]) for r in recs]
    assert all(r["env_world"] == "2" for r in recs)
    assert all(r["device"].split(":")[0] == "cpu" and r["backend"] == "gloo" for r in recs), [(r["device"], r["backend"]) for r in recs]
    # 16 examples, batch 4, 2 ranks -> 2 optimizer steps per epoch per rank, 6 epochs.
    assert all(r["steps"] == 12 for r in recs), [r["steps"] for r in recs]
    # The ranks trained on different shards of the data...
    r0, r1 = sorted(recs, key=lambda r: r["rank"])
    assert r0["seen"] != r1["seen"]
    assert all(len(r["seen"]) == 12 for r in recs)  # each rank collated only its own 2 batches per epoch
    for e in range(6):  # in every epoch the two shards partition the 16 examples
        shard = r0["seen"][2 * e:2 * e + 2] + r1["seen"][2 * e:2 * e + 2]
        assert sorted(i for b in shard for i in b) == list(range(16)), (e, shard)
    # ...and DDP's gradient all-reduce kept their weights identical.
    assert r0["checksum"] == r1["checksum"]
    # One scheduler step per optimizer step (not one per rank): 12 steps, warm-up round(12 * 0.25) = 3.
    by_hand = [3e-3 * f for f in [1 / 3, 2 / 3, 1.0] + [(12 - s) / 9 for s in range(3, 12)]]
    for r in recs:
        assert r["lrs"] == pytest.approx(by_hand, rel=1e-12), (r["rank"], r["lrs"])
        first, last = r["losses"][0], r["losses"][-1]
        assert last < first, (r["rank"], r["losses"])


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "ddp_script.py"
    path.write_text(SCRIPT)
    return path


def test_accelerate_launch_runs_two_cpu_ranks_in_sync(script: Path, tmp_path: Path):
    launcher = _bin("accelerate")
    try:
        import accelerate.commands.launch  # noqa: F401
    except ImportError:
        pytest.skip("accelerate's launcher (accelerate.commands.launch) is not importable")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"] if launcher is None else [launcher, "launch"]
    cmd += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "29517", str(script), str(tmp_path)]
    _check(_run(cmd, tmp_path))


def test_torchrun_runs_two_cpu_ranks_in_sync(script: Path, tmp_path: Path):
    launcher = _bin("torchrun")
    if launcher is None:
        pytest.skip("torchrun is not installed next to this interpreter or on PATH")
    cmd = [launcher, "--nproc_per_node", "2", "--nnodes", "1", "--master_port", "29519", str(script), str(tmp_path)]
    _check(_run(cmd, tmp_path))


# --------------------------------------------------------------------------- the forget stage, as a user runs it
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, nproc: int, project: Path, out: Path, batch: int) -> subprocess.CompletedProcess:
    """``unlearn forget --out OUT`` in the tiny project: plainly, under ``accelerate launch`` or ``torchrun``."""
    port = str(_free_port())
    cli = ["-m", "unlearn.cli", "forget", "--out", str(out), "--set", f"method.batch_size={batch}"]
    if kind == "plain":
        cmd = [sys.executable, *cli]
    elif kind == "accelerate":  # the README's command
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if nproc > 1 else []),
               "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", port, *cli]
    else:  # torchrun is torch.distributed.run; `-m unlearn.cli` goes through its --module flag
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master_port", port, "--module", *cli[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               MASTER_ADDR="127.0.0.1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=project)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in 300s:\n{(e.stderr or '')[-3000:]}")
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _check_run(out: Path, world: int, n_rows: int) -> dict:
    """What the run wrote: a loadable model with weights, and the world/shards it saw from inside."""
    from unlearn.models.build import load_model

    assert (out / "model.safetensors").stat().st_size > 10_000, f"no weights in {out}: {sorted(os.listdir(out))}"
    model = load_model(out)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    reports = out.with_name(out.name + ".reports")
    summary = json.loads((reports / "summary.json").read_text())
    log = json.loads((reports / "loss.json").read_text())
    assert summary["world_size"] == world, summary
    ends = [e for e in log if e.get("shard_rows") is not None]  # the epoch ends (other rows hold null)
    assert len(ends) == 2  # one per epoch (method.epochs: 2 in the tiny project)
    for e in ends:  # every epoch: each rank took its part, together every row exactly once
        assert len(e["shard_rows"]) == world and sum(e["shard_rows"]) == n_rows and e["rows_seen"] == n_rows, e
    return {"summary": summary, "log": log}


import torch  # noqa: E402  (after the script text, which must not import it at module level here)

N_FORGET = 24  # tiny project: forget10 = 3 authors x 8 QA


def test_forget_under_accelerate_launch_two_ranks_five_times(tiny_project: Path, tmp_path: Path):
    """The README's multi-process command, five times in a row: never a failed save, always a real model."""
    for i in range(5):
        out = tmp_path / f"u{i}"
        res = _launch("accelerate", 2, tiny_project, out, batch=8)
        run = _check_run(out, world=2, n_rows=N_FORGET)
        assert run["summary"]["steps"] == 4  # ceil(24 / (8 x 2)) = 2 steps per epoch, 2 epochs
        assert res.stdout.count("unlearned model") == 1, res.stdout  # only rank 0 reports


def test_forget_under_torchrun_two_ranks(tiny_project: Path, tmp_path: Path):
    _launch("torchrun", 2, tiny_project, tmp_path / "u", batch=8)
    _check_run(tmp_path / "u", world=2, n_rows=N_FORGET)


def test_same_result_whatever_the_launcher(tiny_project: Path, tmp_path: Path):
    """`unlearn forget` (batch 16), `accelerate launch` with 1 process (batch 16) and 2 ranks (batch 8 each).

    The LR of every step must be identical (same global batches, same schedule). The models may differ only by
    floating-point summation order: two ranks sum the per-row terms of a step in two halves and add them in
    gloo's all-reduce, and matmuls over 8 rows block differently from 16 (~1e-7 relative per float32 sum).
    Measured over the 4 Adam steps here: 1 process under accelerate = plain run bit for bit; 2 ranks differ by
    4e-9 in forget probability, 2e-9 in retain probability and at most 7e-8 in any evaluation metric. The
    test allows 1e-6 on the probabilities and 1e-5 (relative) on the metrics, a hundredfold margin, while a
    real difference in data or schedule (one row seen twice, a halved LR) moves them by 1e-3 or more.
    """
    runs = {}
    for name, kind, nproc, batch in (("plain", "plain", 1, 16), ("accelerate1", "accelerate", 1, 16),
                                     ("ranks2", "accelerate", 2, 8)):
        _launch(kind, nproc, tiny_project, tmp_path / name, batch)
        runs[name] = _check_run(tmp_path / name, world=nproc, n_rows=N_FORGET)
    lrs = {k: [e["lr"] for e in r["log"]] for k, r in runs.items()}
    assert lrs["plain"] == lrs["accelerate1"] == lrs["ranks2"], lrs
    assert [e["rows"] for e in runs["ranks2"]["log"]] == [e["rows"] for e in runs["plain"]["log"]] == [16, 8] * 2
    base = runs["plain"]
    for name in ("accelerate1", "ranks2"):
        for key in ("forget_prob", "retain_prob"):
            assert runs[name]["summary"][key] == pytest.approx(base["summary"][key], abs=1e-6), (name, key)
        for e0, e1 in zip(base["log"], runs[name]["log"]):
            for key in ("loss", "forget_loss", "retain_loss", "dipo_delta"):
                assert e1[key] == pytest.approx(e0[key], rel=1e-5, abs=1e-6), (name, e0["step"], key)
    # The evaluation metrics of the three models agree too.
    metrics = {}
    for name in runs:
        res = subprocess.run([sys.executable, "-m", "unlearn.cli", "evaluate", str(tmp_path / name), "--name", name,
                              "--out", str(tmp_path / f"eval_{name}")], capture_output=True, text=True,
                             cwd=tiny_project, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())
    for name in ("accelerate1", "ranks2"):
        for key, v in metrics["plain"].items():
            if isinstance(v, float):
                assert metrics[name][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, key)


# --------------------------------------------------------------------------- FSDP (torch FSDP2 on gloo ranks)
FSDP_SCRIPT = textwrap.dedent(
    '''
    import json, sys
    from pathlib import Path

    import torch

    from unlearn.config import ArchCfg
    from unlearn.models.build import build_model, train_tokenizer
    from unlearn.models.formatting import collate, encode_many
    from unlearn.models.scoring import mean_nll
    from unlearn.train import LoopCfg, consolidate, fsdp2_shard, make_accelerator, train_loop

    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    questions = [f"What is fact number {i} about author {i % 5}?" for i in range(16)]
    answers = [f"Author {i % 5} wrote book {i} in the year {1900 + 7 * i}." for i in range(16)]
    tok = train_tokenizer([q + " " + a for q, a in zip(questions, answers)] * 4, 300)
    arch = ArchCfg(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    enc = encode_many(tok, questions, answers, 48)
    acc = make_accelerator()
    world, rank = acc.num_processes, acc.process_index
    model = build_model(arch, tok, seed=0)
    full = {n: p.numel() for n, p in model.named_parameters()}
    local = dict(full)
    if mode == "fsdp":
        from torch.distributed.tensor import DTensor

        fsdp2_shard(model)
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values()), [n for n, p in params.items()
                                                                      if not isinstance(p, DTensor)]
        local = {n: p.to_local().numel() for n, p in params.items()}
        placements = sorted({str(p.placements) for p in params.values()})
    cfg = LoopCfg(epochs=3, batch_size=8 // world, lr=3e-3, warmup_ratio=0.25, seed=0, desc=f"{mode} test")

    def step_loss(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return mean_nll(logits, batch["labels"], batch.get("n_tokens")), {}

    log = train_loop(model, len(enc), lambda idx, ep: collate([enc[i] for i in idx], tok.pad_token_id), step_loss,
                     cfg, accelerator=acc)
    whole = consolidate(acc, model, lambda: build_model(arch, tok, seed=0))
    rec = {"rank": rank, "world": world, "full": full, "local": local,
           "placements": placements if mode == "fsdp" else None}
    if whole is not None:
        torch.save({n: p.detach().clone() for n, p in whole.named_parameters()}, out / "weights.pt")
        rec.update(losses=[e["loss"] for e in log], lrs=[e["lr"] for e in log], rows=[e["rows"] for e in log])
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    '''
)


def test_fsdp2_on_two_cpu_ranks_shards_and_matches_the_unsharded_run(tmp_path: Path):
    """torch FSDP2 (``train.fsdp2_shard``) under torchrun on 2 gloo ranks, against one unsharded process.

    ``accelerate`` with ``cpu=True`` and an FSDP plugin silently trains plain DDP (../shared/STACK.md), so the
    sharding is torch's own, and the test asserts that it really happened: every parameter is a DTensor, and
    each rank holds about half of each. The same global batch (8 rows = 1 x 8 = 2 x 4) gives the same loss of
    every step and the same final weights up to float32 summation order: the tolerance of
    test_same_result_whatever_the_launcher (1e-5 relative on the losses), 1e-6 absolute on the weights.
    """
    launcher = _bin("torchrun")
    if launcher is None:
        pytest.skip("torchrun is not installed next to this interpreter or on PATH")
    script = tmp_path / "fsdp_script.py"
    script.write_text(FSDP_SCRIPT)
    plain_dir, fsdp_dir = tmp_path / "plain", tmp_path / "fsdp"
    plain_dir.mkdir()
    fsdp_dir.mkdir()
    (plain,) = _run([sys.executable, str(script), str(plain_dir), "plain"], plain_dir)
    ranks = _run([launcher, "--nproc_per_node", "2", "--nnodes", "1", "--master_port", str(_free_port()),
                  str(script), str(fsdp_dir), "fsdp"], fsdp_dir)
    assert plain["world"] == 1 and sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world"] == 2 for r in ranks)
    # Really sharded: each rank holds a part of every parameter, the parts add up to the whole.
    for name, n in ranks[0]["full"].items():
        parts = [r["local"][name] for r in ranks]
        assert sum(parts) == n and max(parts) < n, (name, parts, n)
    assert ranks[0]["placements"] == ["(Shard(dim=0),)"]
    main = next(r for r in ranks if r["rank"] == 0)
    assert main["rows"] == plain["rows"] and main["lrs"] == plain["lrs"]
    assert main["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-7)
    assert main["losses"][-1] < main["losses"][0]
    a, b = torch.load(plain_dir / "weights.pt"), torch.load(fsdp_dir / "weights.pt")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - c).abs().max().item() for k, c in _initial(a).items())
    assert worst <= 1e-6 and moved > 1e-3, (worst, moved)  # equal, and training did move the weights


def _initial(trained: dict) -> dict:
    """The untrained weights of the scripts' model (same tokenizer, same seed)."""
    ns: dict = {}
    exec(FSDP_SCRIPT.split("out, mode =")[0], ns)  # the imports
    exec(textwrap.dedent('''
        questions = [f"What is fact number {i} about author {i % 5}?" for i in range(16)]
        answers = [f"Author {i % 5} wrote book {i} in the year {1900 + 7 * i}." for i in range(16)]
        tok = train_tokenizer([q + " " + a for q, a in zip(questions, answers)] * 4, 300)
        arch = ArchCfg(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, max_position_embeddings=64)
        model = build_model(arch, tok, seed=0)
    '''), ns)
    return {n: p.detach() for n, p in ns["model"].named_parameters() if n in trained}
