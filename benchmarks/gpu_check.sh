#!/usr/bin/env bash
# On a machine with a CUDA GPU, in under 5 minutes (the two parts have 150 s and 120 s limits):
#
#     bash benchmarks/gpu_check.sh [--dry-run]
#
# 1. the oracle tests (tests/test_oracle.py: every layer family, forced routes, whole models, in
#    float64 and float32 against torch.func in float64) with models and data on CUDA
#    (INRUN_TEST_DEVICE=cuda; tests/conftest.py turns TF32 off, as float32 tolerances assume);
# 2. GPT-2 small (12 x 768, 16 x 1024 tokens, 1 validation sequence) plain vs order 1 vs
#    Adam-aware order 1 vs order 2 (trapezoid) as throughput (tokens/s), ratios and peak step
#    memory (benchmarks/gpu_check.py; every clock reading after torch.cuda.synchronize()).
# Output goes to the terminal and to $OUT (default gpu_check/): oracle.log, throughput.md.
# --dry-run prints the steps and the harness's plan without needing a GPU (the suite runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check}
DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi

export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
oracle=(env INRUN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_oracle.py)
harness=("$PYTHON" benchmarks/gpu_check.py --device cuda --steps 10 --warmup 2)

if [[ -n "$DRY" ]]; then
  echo "would run: ${oracle[*]} > $OUT/oracle.log"
  echo "would run: ${harness[*]} > $OUT/throughput.md"
  "${harness[@]}" --dry-run
  exit 0
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
mkdir -p "$OUT"
start=$(date +%s)
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
status=0
timeout 150 "${oracle[@]}" 2>&1 | tee "$OUT/oracle.log" || status=$?
echo "(oracle tests on CUDA: exit $status, $(( $(date +%s) - start )) s)"
timeout 120 "${harness[@]}" 2>&1 | tee "$OUT/throughput.md" || status=$?
echo "(all: $(( $(date +%s) - start )) s)"
exit $status
