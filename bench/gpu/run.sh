#!/bin/bash
# The GPU benchmark in one command: builds (unless BUILD names a ready build
# directory), measures the card's ceilings and the CUTLASS grouped GEMM (ceilings.py),
# runs the engine on a dense 8192^3 GEMM, the expert GEMMs alone, loramoe's layer
# benchmark (bf16 and FP8 experts; the FP8 ceiling and torch's FP8 grouped GEMM where
# this torch has them) and the torch peer on the same card, and prints the ratios
# (report.py).
#   bash bench/gpu/run.sh [presets...]        e.g. bash bench/gpu/run.sh qwen3
# Env: BUILD (default build-cuda), MS (default 512,2048,8192,16384), ITERS (50), OUTDIR,
# LMOE_COMMIT (the commit to print, for a tree copied out of its checkout).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD:-$root/build-cuda}
ms=${MS:-512,2048,8192,16384}
iters=${ITERS:-50}
outdir=${OUTDIR:-$build/bench-out}
mkdir -p "$outdir"
if [ ! -x "$build/bench/gpu/bench_gpu" ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLMOE_LUA=OFF >/dev/null
  cmake --build "$build" -j --target bench_gpu >/dev/null
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
echo "commit: ${LMOE_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "== ceilings and the CUTLASS grouped GEMM"
python3 "$root/bench/gpu/ceilings.py" --m "$ms" --iters "$iters" --env "$outdir/peaks.env" --csv "$outdir/grouped.csv" \
  --csv-fp8 "$outdir/grouped_fp8.csv"
# shellcheck disable=SC1091
source "$outdir/peaks.env"
echo "== loramoe: the sm90 engine on a dense GEMM"
"$build/bench/gpu/bench_gpu" --dense 8192 --iters 20
echo "== loramoe: expert GEMMs alone"
"$build/bench/gpu/bench_gpu" --gemms "$@" --m "$ms" --iters "$iters" --csv "$outdir/gemms.csv"
echo "== loramoe: the layer"
"$build/bench/gpu/bench_gpu" "$@" --m "$ms" --iters "$iters" --stack --csv "$outdir/loramoe.csv"
echo "== loramoe: the layer, FP8 e4m3 experts (own CSV: report.py's LoRA cost is against bf16's no adapter)"
"$build/bench/gpu/bench_gpu" --fp8-only "$@" --m "$ms" --iters "$iters" --csv "$outdir/loramoe_fp8.csv"
echo "== torch peer (torch._grouped_mm GEMMs, torch routing/LoRA/reduction)"
python3 "$root/bench/peer_torch.py" --m "$ms" --iters "$iters" --csv "$outdir/peer.csv" "$@"
echo "== loramoe: expert GEMMs alone, FP8 e4m3 (a failure here leaves the rest of the run)"
"$build/bench/gpu/bench_gpu" --gemms --fp8-only "$@" --m "$ms" --iters "$iters" --csv "$outdir/gemms_fp8.csv" ||
  echo "FP8 expert GEMMs alone: bench_gpu failed"
echo "== summary"
python3 "$root/bench/gpu/report.py" "$outdir"
