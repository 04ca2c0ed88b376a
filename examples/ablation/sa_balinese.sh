#!/bin/bash
# One-factor-at-a-time variations of the study's MetaXL run on NusaX balinese <- indonesian (binary,
# seed 1): the settings docs/results.md reports under "What was tried". Each run changes one thing
# from examples/sweeps/study_sa.yaml's MetaXL run; results land in runs/ablation/<name>/results.json.
#   bash examples/ablation/sa_balinese.sh            # about 15 min per run on one CPU core
set -eu
BASE="--target nusax:balinese --source nusax:indonesian --task sa --sa-labels binary --method metaxl
      --target-size 100 --source-size 200 --data-seed none --epochs 10 --batch-size 10 --lr 1e-4
      --head-lr 3e-3 --meta-lr 1e-4 --freeze-embeddings --warmup 0.1 --max-length 128 --rtn-layers 12
      --seed 1 --no-save-checkpoint --no-progress"
run() {  # name, flags that differ from BASE
  local name=$1; shift
  if grep -qs '"status": "finished"' runs/ablation/$name/results.json; then echo "skip $name"; return; fi
  metaxl train $BASE "$@" --output-dir runs/ablation/$name
}
run meta-lr-1e-3 --meta-lr 1e-3
run meta-lr-1e-5 --meta-lr 1e-5
run rtn-layer-0 --rtn-layers 0
run rtn-plain --rtn-variant plain
run meta-batch-separate --meta-batch separate
run inner-lr-1e-3 --inner-lr 1e-3
run rtn-layers-0-12 --rtn-layers 0,12
