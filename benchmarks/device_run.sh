#!/usr/bin/env bash
# The GPU checks in one command, on a GPU machine without network (the kit: benchmarks/device_kit.py).
#
#   python benchmarks/device_kit.py build --out .kit                      # here, once
#   KIT=.kit OUT=/tmp/out DEADLINE=430 bash benchmarks/device_run.sh      # there, in the repo's root
#   KIT=.kit OUT=/tmp/out bash benchmarks/device_run.sh tests bench       # only some steps
#
# Steps (default: bench sweeps tests, in this order):
#   bench   step_cost.py on $BENCH_DEVICE (cuda): $BENCH_MODELS (e5-small fp32, xlmr-base-random
#           fp32 and bf16), exact and finite-difference MetaXL and the opt-in options
#           ($BENCH_METHODS), operators counted -> $OUT/step_cost_<model>_<precision>.txt
#   sweeps  the two study sweeps side by side (--jobs $JOBS each, save_state off), each first on the
#           runs $SWEEP_FIRST selects (default: --only seed=2) and then on all the others, until
#           DEADLINE seconds after the start; their finished runs -> $OUT/runs.tgz (paths from the
#           repo root: `tar xzf runs.tgz` there adds them to results/), packed again every
#           $PACK_EVERY seconds, so a call cut short still returns the runs finished by then
#   tests   python -m pytest tests/test_gpu.py                            -> $OUT/gpu_tests.log
# The sweeps run in the background: a step after them (tests) runs beside them, and the script
# waits for them at the end. bench runs alone, before them, so that its timings are the GPU's own.
# At most 7 files land in $OUT (a lent machine returns 8). The repo's src/ and the kit's site/ go on
# PYTHONPATH: nothing is installed. Unfinished sweep runs
# are lost with the machine (save_state is off there: writing the state cost more than an epoch).
set -uo pipefail
KIT=${KIT:-.kit}
OUT=${OUT:-device-out}
DEADLINE=${DEADLINE:-430}
JOBS=${JOBS:-6}
PY=${PYTHON:-python3}
BENCH_METHODS=${BENCH_METHODS:-jt,metaxl,metaxl-fd,metaxl-reuse,metaxl-upper6,metaxl-upper6-reuse,metaxl-fd-reuse}
BENCH_MODELS=${BENCH_MODELS:-default:fp32 xlmr-base-random:fp32 xlmr-base-random:bf16}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
STEPS=${*:-bench sweeps tests}
SWEEP_FIRST=${SWEEP_FIRST---only seed=2}
PACK_EVERY=${PACK_EVERY:-30}
SWEEPS=${SWEEPS:-examples/sweeps/study_ner.yaml examples/sweeps/study_sa.yaml}
mkdir -p "$OUT"
ROOT=$PWD
export PYTHONPATH="$ROOT/src:$ROOT/$KIT/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
       METAXL_DATA="$ROOT/$KIT/data" METAXL_CACHE="${METAXL_CACHE:-/tmp/metaxl-cache}" \
       TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
log() { echo "[$(date -u +%T) +${SECONDS}s] $*"; }
left() { echo $((DEADLINE - SECONDS)); }

log "device_run: steps '$STEPS', deadline ${DEADLINE}s"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
$PY benchmarks/device_kit.py install --kit "$KIT" || { log "kit install failed"; exit 1; }
STAMP=$(mktemp)
sweep_pids=()
packer=
pack() {  # the sweeps' runs finished since the start -> $OUT/runs.tgz (written aside, then moved;
  # files named by the packing process, so a tar of the killed packer never writes the final one's)
  local list=/tmp/new_runs.$BASHPID.txt part=/tmp/runs.$BASHPID.tgz
  find results -name results.json -newer "$STAMP" -print0 \
    | xargs -0 -r grep -l '"status": "finished"' | xargs -r -n1 dirname | sort > "$list"
  tar czf "$part" --exclude=train_state --exclude=checkpoint -T "$list" && mv "$part" "$OUT/runs.tgz"
  wc -l < "$list"
  rm -f "$list"
}

for step in $STEPS; do
  case $step in
  tests)
    log "tests"
    $PY -m pytest tests/test_gpu.py -o addopts="" -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    ;;
  bench)
    common=(--device "$BENCH_DEVICE" --batch-size 10 --seq-len 128 --steps 8 --warmup 2 --adamw foreach
            --count-ops --methods "$BENCH_METHODS")
    for spec in $BENCH_MODELS; do
      model=${spec%%:*} precision=${spec##*:}
      log "step_cost --model $model --precision $precision"
      $PY benchmarks/step_cost.py "${common[@]}" --model "$model" --precision "$precision" \
        > "$OUT/step_cost_${model}_$precision.txt" 2>&1
      tail -15 "$OUT/step_cost_${model}_$precision.txt"
    done
    ;;
  sweeps)
    if [ "$(left)" -lt 60 ]; then log "no time left for the sweeps"; continue; fi
    for f in $SWEEPS; do
      tmp="/tmp/$(basename "$f")"
      # the same runs (save_state does not change a run's config hash) without the per-epoch state
      $PY - "$f" "$tmp" <<'EOF'
import sys, yaml
spec = yaml.safe_load(open(sys.argv[1]))
spec.setdefault("base", {})["save_state"] = False
yaml.safe_dump(spec, open(sys.argv[2], "w"), sort_keys=False)
EOF
      runs_dir=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['runs_dir'])" "$f")
      log "sweep $f for $(left)s${SWEEP_FIRST:+, first $SWEEP_FIRST}"
      (
        for phase in ${SWEEP_FIRST:+first} all; do
          [ "$(left)" -gt 30 ] || break
          if [ $phase = first ]; then only=($SWEEP_FIRST); else only=(); fi
          timeout --signal=TERM --kill-after=30 "$(left)" \
            $PY -m metaxl sweep "$tmp" --runs-dir "$runs_dir" --jobs "$JOBS" --no-progress "${only[@]}"
        done
      ) > "$OUT/sweep_$(basename "$f" .yaml).log" 2>&1 &
      sweep_pids+=($!)
    done
    ( while sleep "$PACK_EVERY"; do pack > /dev/null; done ) &
    packer=$!
    ;;
  *) log "unknown step '$step' (bench, sweeps, tests)"; exit 2 ;;
  esac
done
if [ ${#sweep_pids[@]} -gt 0 ]; then
  wait "${sweep_pids[@]}"
  kill "$packer" 2>/dev/null
  log "sweeps stopped; $(pack) finished runs packed in $OUT/runs.tgz (tar tzf lists them)"
fi
log "done"
