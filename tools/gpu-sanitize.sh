#!/bin/bash
# compute-sanitizer over the GPU tests: memcheck, racecheck and synccheck, every test
# under every tool, side by side (they share the card; each run is 10-100x slower than
# the test alone). Fails when a run fails or reports an error or hazard.
#   bash tools/gpu-sanitize.sh [build-dir]         (make test-gpu runs it after ctest)
# Env: SAN_TIMEOUT (s per run, default 1200), SAN_OUT (log directory, default
# build-dir/sanitize).
# Not here: test_gpu_sync, whose point is CUPTI's count of host synchronisations and
# CUPTI cannot attach under the sanitizer (the plain ctest run proves it);
# test_gpu_shard runs with LMOE_TEST_NO_CUPTI (its CUPTI counts skipped, the rest run).
# Expected refusals (the tests provoke out-of-memory) are API errors the library
# handles, so memcheck does not report API errors; the barrier watchdog of the sm90
# engine is off (the tools slow waits down past any fixed limit).
set -u
build=${1:-build-cuda}
out=${SAN_OUT:-$build/sanitize}
mkdir -p "$out"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$cs" ] || { echo "gpu-sanitize: compute-sanitizer not found"; exit 1; }
# LMOE_TEST_QUICK: test_gpu_forward's fixed corner cases only (every engine path,
# adapters up to rank 80; its random cases and the 1,000-forward memory check run in
# the plain ctest pass), so racecheck, which keeps state per shared-memory byte,
# finishes in minutes
export LMOE_SM90_WATCHDOG_MS=0 LMOE_TEST_QUICK=1 LMOE_TEST_NO_CUPTI=1
declare -A opts=([memcheck]="--report-api-errors no" [racecheck]="--racecheck-report hazard" [synccheck]="")
pids=()
names=()
run() { # test tool
  local log="$out/$(basename "$1").$2.log"
  # shellcheck disable=SC2086
  (cd "$build" && timeout "${SAN_TIMEOUT:-1200}" "$cs" --tool "$2" ${opts[$2]} --error-exitcode 99 "$1" >"$log" 2>&1
   echo "exit $?" >>"$log")
}
tests=()
for t in "$build"/tests/gpu/test_gpu_*; do
  [ -x "$t" ] || continue
  [ "$(basename "$t")" = test_gpu_sync ] && continue
  tests+=("$t")
done
# memcheck and synccheck side by side; racecheck one test at a time beside them (it
# keeps host-side state per shared-memory byte: several at once were killed for memory)
(for t in "${tests[@]}"; do run "$t" racecheck; done) &
pids+=($!)
for t in "${tests[@]}"; do
  for tool in memcheck synccheck; do
    run "$t" $tool &
    pids+=($!)
  done
done
for t in "${tests[@]}"; do for tool in memcheck racecheck synccheck; do names+=("$(basename "$t") $tool"); done; done
wait "${pids[@]}"
fail=0
for i in "${!names[@]}"; do
  set -- ${names[$i]}
  log="$out/$1.$2.log"
  rc=$(tail -1 "$log" | sed 's/exit //')
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed, .* failed" "$log" | tr '\n' ' ')
  status=ok
  if [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; fail=1; fi
  printf '%-18s %-10s %s  %s\n' "$1" "$2" "$status" "$summary"
  [ "$rc" != 0 ] && grep -E "Invalid|Hazard|hazard|error|FAIL|failed" "$log" | grep -v "0 failed" | head -8 | sed 's/^/    /'
done
exit $fail
