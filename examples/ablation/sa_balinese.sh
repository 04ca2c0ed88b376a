#!/bin/bash
# One-factor-at-a-time variations of the study's MetaXL run on NusaX balinese <- indonesian (binary,
# seed 1): the settings docs/ablation.md reports (meta lr, inner lr, RTN layer
# and variant, meta-batch split, a per-group virtual-step lr) and the cost options of docs/performance.md (finite differences,
# a virtual step limited to the upper layers, trained word embeddings, the source gradient reused,
# training batches grouped by length). Each run changes one thing
# from examples/sweeps/study_sa.yaml's MetaXL run; results land in results/ablation/<name>/results.json.
#   bash examples/ablation/sa_balinese.sh     # 35-50 min per run on one CPU core, ~2 min on a GPU
#   bash examples/ablation/sa_balinese.sh &   # again, for a second worker (e.g. on the second core;
#   with two workers on a 2-core CPU set OMP_NUM_THREADS=1 for each, or 4 threads fight for 2 cores: 3x slower)
set -eu
BASE="--target nusax:balinese --source nusax:indonesian --task sa --sa-labels binary --method metaxl
      --target-size 100 --source-size 200 --data-seed none --epochs 10 --batch-size 10 --lr 1e-4
      --head-lr 3e-3 --meta-lr 1e-4 --freeze-embeddings --warmup 0.1 --max-length 128 --rtn-layers 12
      --seed 1 --no-save-checkpoint --no-progress"
run() {  # name, flags that differ from BASE
  local name=$1; shift
  if grep -qs '"status": "finished"' results/ablation/$name/results.json; then echo "finished: $name"; return; fi
  # a folder without a finished results.json: another worker is on it, or it was killed (delete it)
  mkdir -p results/ablation; mkdir results/ablation/$name 2>/dev/null || { echo "taken: $name"; return; }
  ${METAXL:-metaxl} train $BASE "$@" --output-dir results/ablation/$name  # METAXL="python -m metaxl" without the entry point
}
RUNS=(  # in order of priority; finished ones are skipped
  "meta-lr-1e-3 --meta-lr 1e-3"
  "rtn-plain --rtn-variant plain"
  "inner-lr-1e-3 --inner-lr 1e-3"
  "rtn-layers-0-12 --rtn-layers 0,12"
  "hypergrad-fd-same-masks --hypergrad finite-difference"  # see the note at the end of the list
  "virtual-from-layer-7 --virtual-from-layer 7"
  "no-freeze-embeddings --no-freeze-embeddings"
  "reuse-source-gradient --reuse-source-gradient"
  "reference-metaxl-cpu"  # the study's MetaXL run itself, on this machine (the references ran on a GPU)
  "reference-jt-cpu --method jt"  # and its JT run
  "jt-no-freeze-embeddings --method jt --no-freeze-embeddings"  # JT's side of no-freeze-embeddings
  "inner-lr-per-group --inner-lr-per-group"
  "rtn-layer-0 --rtn-layers 0"
  "meta-batch-separate --meta-batch separate"
  "reference-metaxl-cpu-seed2 --seed 2"  # finite differences vs exact on a second seed (sample and init):
  "hypergrad-fd-same-masks-seed2 --hypergrad finite-difference --seed 2"  # does it again beat the exact mixed term?
  "reference-jt-cpu-seed2 --method jt --seed 2"  # and JT on that seed
  "meta-lr-1e-5 --meta-lr 1e-5"
  "group-by-length --group-by-length"  # the opt-in batching of docs/performance.md: does accuracy move?
  "jt-group-by-length --method jt --group-by-length"
  # The finite-difference runs are named -same-masks: they ran after commit 9dead71, whose shifted
  # forwards replay the dropout masks of the forward that gave g. The runs before it (hypergrad-fd,
  # hypergrad-fd-seed2), whose estimate was mostly mask noise, are in results/ablation-superseded.
)
# several workers (e.g. one per core) share the list: each takes the next run no one has taken
for r in "${RUNS[@]}"; do run $r; done
