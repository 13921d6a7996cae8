#!/usr/bin/env bash
# Kill drill: kill -9 a smoke sweep (and its workers) at five points, rerun it each time, then check
# that its tables and plots are byte for byte those of an uninterrupted sweep. Run by CI (make drill).
set -euo pipefail
cd "$(dirname "$0")/.."
ILORA=${ILORA:-.venv/bin/ilora}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/drill.yaml" <<'YAML'
name: drill
title: Kill drill
table: {rows: [method], columns: [dataset]}
plots: [rounds, communication]
presets:
  smoke:
    base: {rounds: 3, local_steps: 2, max_train_samples: 60, max_test_samples: 30, max_length: 16}
    grid:
      dataset: [bbc_news]
      method: [fedit, ilora_s, flora]
      seed: [1, 2]
YAML

sweep() {  # sweep OUT_DIR RESULTS_DIR
  "$ILORA" sweep "$work/drill.yaml" --preset smoke --jobs 2 --out-dir "$1" --results-dir "$2" --report
}

echo "kill drill: uninterrupted reference sweep"
sweep "$work/reference" "$work/reference-results" > "$work/reference.log" 2>&1 || { tail -5 "$work/reference.log"; exit 1; }

for delay in 5 7 9 11 13; do
  setsid "$ILORA" sweep "$work/drill.yaml" --preset smoke --jobs 2 --out-dir "$work/runs" \
    --results-dir "$work/results" --report > /dev/null 2>&1 &
  leader=$!
  sleep "$delay"
  kill -9 -- "-$leader" 2> /dev/null || true  # the sweep's whole process group: it and its workers
  wait "$leader" 2> /dev/null || true
  done_runs=$( (find "$work/runs" -name result.json 2> /dev/null || true) | wc -l)
  echo "kill drill: killed -9 after ${delay}s; ${done_runs} of 6 runs finished so far"
done

echo "kill drill: final rerun"
sweep "$work/runs" "$work/results" > /dev/null 2>&1

status=0
for file in $(cd "$work/reference-results" && find . -type f ! -name PROVENANCE.md | sort); do
  if ! cmp -s "$work/reference-results/$file" "$work/results/$file"; then
    echo "kill drill: $file differs from the uninterrupted sweep's"
    status=1
  fi
done
count=$(cd "$work/reference-results" && find . -type f ! -name PROVENANCE.md | wc -l)
[ "$count" -gt 0 ] || { echo "kill drill: no tables were written"; exit 1; }
[ "$status" -eq 0 ] && echo "kill drill: ${count} table and plot files byte-identical after 5 kills"
exit "$status"
