#!/bin/sh
# The cpu backend's benchmark (bench/bench_cpu.c, unchanged) built for wasm32 against
# the threaded module's objects and run under Node: the same cases and counting as the
# native bench_cpu, so the two tables compare directly (docs/benchmarks.md).
#
#   wasm/bench.sh [OUT] [threads, e.g. 1,2] [preset: 0 tiny, 1 mid]    (after make wasm)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-build-wasm}
threads=${2:-1,$(nproc 2>/dev/null || echo 2)}
[ -d /usr/share/nodejs ] && export NODE_PATH=${NODE_PATH:+$NODE_PATH:}/usr/share/nodejs
obj=$out/obj-mt
[ -f "$obj/core_cpu_forward.o" ] || { echo "wasm/bench.sh: run make wasm first" >&2; exit 1; }
mkdir -p "$out/bench"
emcc -O3 -pthread -msimd128 -std=c11 -D_GNU_SOURCE -I"$here/native/include" -I"$here/bench" \
  "$here/bench/bench_cpu.c" "$obj"/core_*.o "$obj/cJSON.o" -o "$out/bench/bench_cpu.js" \
  -sENVIRONMENT=node -sALLOW_MEMORY_GROWTH=1 -sMAXIMUM_MEMORY=4GB -sPTHREAD_POOL_SIZE=32 \
  -sEXIT_RUNTIME=1 -Wno-pthreads-mem-growth
shift $(( $# > 2 ? 3 : $# ))
node --no-experimental-fetch "$out/bench/bench_cpu.js" "$threads" "$@"
