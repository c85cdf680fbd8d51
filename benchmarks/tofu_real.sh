#!/usr/bin/env bash
# A small Llama trained from scratch on the real TOFU files, then DiPO, then TOFU evaluation of all three
# models. Needs ../shared/data/tofu (see ../shared/data/SOURCES.md). About 40 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
P=(--params configs/tofu_real.yaml)
U=${UNLEARN:-.venv/bin/unlearn}
$U prepare "${P[@]}"
$U tokenizer "${P[@]}"
$U validate "${P[@]}"   # the gate, and the rows cut at model.max_length (reports/tofu_real/validation/result.json)
$U finetune --role retain "${P[@]}"
$U finetune --role target "${P[@]}"
$U forget "${P[@]}"
for m in retain target unlearned; do
  $U evaluate models/tofu_real/$m --name $m "${P[@]}"
done
$U summary "${P[@]}"
