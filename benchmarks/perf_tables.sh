#!/usr/bin/env bash
# The tables of docs/performance.md, measured on an idle machine (2 threads, nothing else running):
#
#     bash benchmarks/perf_tables.sh [OUTPUT.md]      (default perf_tables.md; ~25 min on 2 cores)
#
# One `inrun bench` per workload, each with the methods its targets name (the per-example
# baselines only where they take seconds, on M and L; the Hessian variant only on M), 20 timed
# steps per method in 4 alternating rounds, peak memory in fresh processes. STEPS=N overrides the
# step count (>= 20 for results); WORKLOADS="R A" runs a subset. Each workload's wall time goes to
# stderr and the file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-perf_tables.md}
STEPS=${STEPS:-20}
WORKLOADS=${WORKLOADS:-"R S A L M E T"}

order1="plain,order 1,order 1 + book-keeping,plain + validation pass"
declare -A METHODS=(
  [R]="$order1,order 2 trapezoid,plain AdamW,Adam-aware order 1"
  [S]="$order1"  # S's target is order 1's; its other methods take 2-4 s a step
  [A]=""  # the workload's own list: SGD and AdamW, order 1, book-keeping, the trapezoid
  [L]=""  # the workload's own list: SGD and AdamW, order 1, torch.func per-example
  [M]="$order1,order 2 trapezoid,order 2 hessian,plain AdamW,Adam-aware order 1,torch.func per-example,batch-size-1 loop"
  [E]="plain,order 1,plain + validation pass,torch.func per-example"  # issue 13: against per-example gradients
  [T]="plain,order 1,plain + validation pass,torch.func per-example"
)

{
  echo "# inrun bench tables, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
  echo
} > "$OUT"
total_start=$(date +%s)
for w in $WORKLOADS; do
  start=$(date +%s)
  args=(--workloads "$w" --steps "$STEPS" --threads 2)
  if [[ -n "${METHODS[$w]}" ]]; then args+=(--methods "${METHODS[$w]}"); fi
  PYTHONPATH=src "$PYTHON" -m inrun.cli.bench "${args[@]}" >> "$OUT"
  elapsed=$(( $(date +%s) - start ))
  echo "(workload $w: ${elapsed} s wall)" | tee -a "$OUT" >&2
  echo >> "$OUT"
done
echo "(all: $(( $(date +%s) - total_start )) s wall; load average $(cut -d' ' -f1-3 /proc/loadavg) at the end)" | tee -a "$OUT" >&2
