#!/usr/bin/env bash
# The accelerator check: mask, step, loop and compile benchmarks on whatever device JAX
# finds, each writing JSON into OUT (default $OUT, else ./device_check). Sized to end in
# under 5 minutes on one GPU; pass --quick to smoke-test it on a CPU.
#
#   PYTHONPATH=. bash benchmarks/device_check.sh [OUT] [--quick]
#
# Runs from the checkout with the system JAX (no venv), as on a lent device machine.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
out="${1:-${OUT:-device_check}}"
quick="${2:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-.}"
py="${PYTHON:-python}"

run() {
  local name="$1"; shift
  if [[ -n "${DRY_RUN:-}" ]]; then echo "$py benchmarks/bench_$name.py $*"; return; fi
  echo "== bench_$name $* =="
  timeout 150 "$py" "benchmarks/bench_$name.py" "$@" --json "$out/$name.json" \
    2>&1 | tee "$out/$name.log" || echo "bench_$name failed or timed out (see $out/$name.log)"
}

if [[ -z "${DRY_RUN:-}" ]]; then
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$out/device.txt"
fi
run masks --rounds 5 --slow-rounds 2 $quick
run step --rounds 7 $quick
run loop --rounds 2 $quick
run compile --leaves 16 64 256 --shapes 64x64 1024x1024 --baseline-max-leaves 16 $quick
