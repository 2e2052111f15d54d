#!/usr/bin/env bash
# The tables of docs/performance.md, measured on an idle machine (2 threads, nothing else running):
#
#     bash benchmarks/perf_tables.sh [OUTPUT.md]      (default perf_tables.md)
#
# One `inrun bench` per workload (R, S, A, T, E by default: issue 26's), each with the methods its
# targets name, 20 timed steps per method in 4 alternating rounds, peak memory in fresh processes;
# every table has the time ratio, the CPU-time ratio, the FLOP floor, the ratio over the floor, the
# page faults per step and the memory ratio. Then the targets table (benchmarks/targets.py). The
# file starts with the commit measured (and whether the tree had uncommitted changes), the machine
# and the load average; each workload's wall time goes to stderr and the file.
#
# Time on an idle 2-core machine: about 25 minutes for R S A T E (R ~6, S ~6, A ~8, T ~2, E ~2);
# add L and M (~5 more) with WORKLOADS="R S A T E L M", C (torch.compile, issue 25) with "... C". STEPS=N overrides the step count (>= 20
# for results). REGRESSION=1 also runs benchmarks/regression_a.py against 2ad8569 (~10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-perf_tables.md}
STEPS=${STEPS:-20}
WORKLOADS=${WORKLOADS:-"R S A T E"}

order1="plain,order 1,order 1 + book-keeping,plain + validation pass"
declare -A METHODS=(
  [R]="$order1,order 2 trapezoid,plain AdamW,Adam-aware order 1"
  [S]="$order1"  # S's target is order 1's; its other methods take 2-4 s a step
  [A]=""  # the workload's own list: SGD and AdamW, order 1, book-keeping, the trapezoid
  [L]=""  # the workload's own list: SGD and AdamW, order 1, torch.func per-example
  [M]="$order1,order 2 trapezoid,order 2 hessian,plain AdamW,Adam-aware order 1,torch.func per-example,batch-size-1 loop"
  [E]="plain,order 1,plain + validation pass,torch.func per-example"  # against per-example gradients
  [T]="plain,order 1,plain + validation pass,torch.func per-example"
  [C]=""  # the workload's own list: compiled plain and order 1 beside eager plain and order 1 (issue 25)
)

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit (with uncommitted changes)"; fi
{
  echo "# inrun bench tables, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit"
  echo
  echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
  echo
} > "$OUT"
total_start=$(date +%s)
for w in $WORKLOADS; do
  start=$(date +%s)
  args=(--workloads "$w" --steps "$STEPS" --threads 2)
  if [[ -n "${METHODS[$w]}" ]]; then args+=(--methods "${METHODS[$w]}"); fi
  PYTHONPATH=src "$PYTHON" -m inrun.cli bench "${args[@]}" >> "$OUT"
  elapsed=$(( $(date +%s) - start ))
  echo "(workload $w: ${elapsed} s wall)" | tee -a "$OUT" >&2
  echo >> "$OUT"
done
{
  echo "### Targets (issue 26)"
  echo
  PYTHONPATH=src "$PYTHON" benchmarks/targets.py "$OUT"
  echo
} > "$OUT.targets"
cat "$OUT.targets" >> "$OUT" && rm -f "$OUT.targets"
if [[ "${REGRESSION:-0}" == 1 ]]; then
  echo "### Workload A, this tree against 2ad8569 (benchmarks/regression_a.py)" >> "$OUT"
  echo >> "$OUT"
  "$PYTHON" benchmarks/regression_a.py --against 2ad8569 >> "$OUT" || true
  echo >> "$OUT"
fi
echo "(all: $(( $(date +%s) - total_start )) s wall; load average $(cut -d' ' -f1-3 /proc/loadavg) at the end)" | tee -a "$OUT" >&2
