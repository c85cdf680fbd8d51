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
    cfg = LoopCfg(epochs=6, batch_size=4, lr=3e-3, seed=0, desc="ddp test")

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
        "steps": len(log), "seen": seen,
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
    for r in recs:
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
