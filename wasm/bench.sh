#!/bin/sh
# The cpu backend's benchmark (bench/bench_cpu.c, unchanged) built for wasm32 against
# the threaded module's objects, run under Node or in headless Chromium: the same cases
# and counting as the native bench_cpu, so the tables compare directly
# (docs/benchmarks.md).
#
#   wasm/bench.sh [--chromium] [OUT] [threads, e.g. 1,2] [preset: 0 tiny, 1 mid]
#                                                                    (after make wasm)
#
# Under Node it runs as a program. In Chromium (--chromium; tools/chromium.mjs finds
# the browser) its main runs in a worker (PROXY_TO_PTHREAD: the page's thread must not
# block), in a cross-origin-isolated page (wasm/bench.html) served on the loopback by
# wasm/bench-browser.mjs, which prints what the page printed.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
where=node
[ "${1:-}" = "--chromium" ] && { where=chromium; shift; }
out=${1:-build-wasm}
threads=${2:-1,$(nproc 2>/dev/null || echo 2)}
preset=${3:-}
[ -d /usr/share/nodejs ] && export NODE_PATH=${NODE_PATH:+$NODE_PATH:}/usr/share/nodejs
obj=$out/obj-mt
[ -f "$obj/core_cpu_forward.o" ] || { echo "wasm/bench.sh: run make wasm first" >&2; exit 1; }
CFLAGS="-O3 -pthread -msimd128 -std=c11 -D_GNU_SOURCE -I$here/native/include -I$here/bench"
LDFLAGS="-sALLOW_MEMORY_GROWTH=1 -sMAXIMUM_MEMORY=4GB -sEXIT_RUNTIME=1 -Wno-pthreads-mem-growth"
if [ $where = node ]; then
  mkdir -p "$out/bench"
  emcc $CFLAGS "$here/bench/bench_cpu.c" "$obj"/core_*.o "$obj/cJSON.o" -o "$out/bench/bench_cpu.js" \
    $LDFLAGS -sENVIRONMENT=node -sPTHREAD_POOL_SIZE=32
  exec node --no-experimental-fetch "$out/bench/bench_cpu.js" "$threads" $preset
fi
mkdir -p "$out/bench-web"
emcc $CFLAGS "$here/bench/bench_cpu.c" "$obj"/core_*.o "$obj/cJSON.o" -o "$out/bench-web/bench_cpu.mjs" \
  $LDFLAGS -sENVIRONMENT=web,worker -sMODULARIZE=1 -sEXPORT_ES6=1 -sEXPORT_NAME=createBench \
  -sPROXY_TO_PTHREAD=1 -sPTHREAD_POOL_SIZE=32
cp "$here/wasm/bench.html" "$out/bench-web/index.html"
exec node "$here/wasm/bench-browser.mjs" "$out/bench-web" "$threads" $preset
