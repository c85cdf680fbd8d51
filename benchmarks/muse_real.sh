#!/usr/bin/env bash
# A small Llama trained from scratch on (a CPU-sized cut of) the real MUSE-News files, then DiPO, the MUSE
# evaluation of all three models, and MUSE's sustainability and scalability sequences. Needs
# ../shared/data/muse/news (see ../shared/data/SOURCES.md). Prints each step's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
P=(--params configs/muse_real.yaml)
U=${UNLEARN:-.venv/bin/unlearn}
step() { local t0=$SECONDS; "$@"; echo "[muse_real] $(( SECONDS - t0 ))s: ${*:2:3}"; }
step $U prepare "${P[@]}"
step $U tokenizer "${P[@]}"
step $U validate "${P[@]}"
step $U finetune --role target "${P[@]}"
step $U finetune --role retain "${P[@]}"
step $U forget "${P[@]}"
for m in retain target unlearned; do
  step $U evaluate muse_real/models/$m --name $m "${P[@]}"
done
step $U sequence sustainability "${P[@]}"
step $U sequence scalability "${P[@]}"
$U summary "${P[@]}"
