#!/bin/sh
# Builds loramoe for wasm32 with emscripten: the core with the cpu backend and the file
# formats, cJSON, Lua 5.4 with the loramoe C module (its rows generated from the header
# by lua/gen_core_rows.cmake, so cmake is needed) and its pure-Lua files built in, and
# the `loramoe` command (cli/main.c, cli/adapter.c, cli/checkpoint.c) as the module's main. The same C
# sources as the native build: the core's list is read from native/CMakeLists.txt.
#
#   wasm/build.sh [OUT]      (OUT defaults to build-wasm; sources in OUT/src, see
#                             tools/install-wasm-deps.sh)
#
# Two variants of one module, picked by the loader at run time (wasm/loramoe.mjs):
#   OUT/st/loramoe.{mjs,wasm}   one thread, runs everywhere
#   OUT/mt/loramoe.{mjs,wasm}   pthreads over shared memory (hosts with SharedArrayBuffer)
# Both use SIMD128 (-msimd128): cpu_forward.c's 4-lane vector code becomes f32x4.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-build-wasm}
mkdir -p "$out"
out=$(cd "$out" && pwd)
src=$out/src
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

# emcc's JS optimizer needs Debian's node modules (acorn) when node is not Debian's own.
[ -d /usr/share/nodejs ] && export NODE_PATH=${NODE_PATH:+$NODE_PATH:}/usr/share/nodejs
EMCC=${EMCC:-emcc}

[ -f "$src/lua/src/lapi.c" ] && [ -f "$src/cjson/cJSON.c" ] || {
  echo "wasm/build.sh: Lua or cJSON sources missing under $src (tools/install-wasm-deps.sh)" >&2
  exit 1
}

core=$(sed -n '/^set(LMOE_CORE_SOURCES/,/)/p' "$here/native/CMakeLists.txt" |
  sed 's/set(LMOE_CORE_SOURCES//; s/)//' | tr -s ' \n' '\n' | grep '\.c$')
lua_c=$(ls "$src"/lua/src/*.c | grep -v -e '/lua\.c$' -e '/luac\.c$')

# Debian's luaconf.h names the multiarch triplet in its default C path.
mkdir -p "$src/include"
echo '#define DEB_HOST_MULTIARCH "wasm32-emscripten"' > "$src/include/lua5.4-deb-multiarch.h"
LUA_INC="-I$src/lua/src -I$src/include"
# <cjson/cJSON.h>, as the installed package lays it out.
mkdir -p "$src/include/cjson"
cp "$src/cjson/cJSON.h" "$src/include/cjson/"

OPT="-O3"
WARN="-Wall -Wno-unused-parameter"

# The Lua C module's generated rows, as the CMake build makes them (lua/CMakeLists.txt).
mkdir -p "$out/gen"
cmake -DCC="$EMCC" -DHEADER="$here/native/include/loramoe.h" -DSOURCE="$here/lua/loramoe_core.c" \
  -DOUT="$out/gen/loramoe_core_rows.h" -P "$here/lua/gen_core_rows.cmake"

# One object directory per variant (threads change the code: atomics, TLS).
build_variant() { # build_variant NAME EXTRA_CFLAGS EXTRA_LDFLAGS
  name=$1 cflags=$2 ldflags=$3
  obj=$out/obj-$name
  mkdir -p "$obj" "$out/$name"
  jobs=""
  compile() { # compile OUT.o SOURCE FLAGS...   ($dep: a header it includes, or "")
  o=$1
  s=$2
  shift 2
  if [ ! -f "$o" ] || [ "$s" -nt "$o" ] || [ "$here/wasm/build.sh" -nt "$o" ] ||
     { [ -n "$dep" ] && [ "$dep" -nt "$o" ]; }; then
    echo "  CC $name $(basename "$s")"
    "$EMCC" $OPT $cflags "$@" -c "$s" -o "$o" &
    jobs="$jobs $!"
    if [ "$(echo $jobs | wc -w)" -ge "$JOBS" ]; then
      for j in $jobs; do wait "$j"; done
      jobs=""
    fi
  fi
  }
  # Objects of loramoe's own sources are rebuilt when any of its headers is newer (a
  # struct that changed in internal.h leaves every old object wrong); Lua and cJSON
  # include none of them.
  dep=""
  for f in $lua_c; do
    compile "$obj/lua_$(basename "$f" .c).o" "$f" -DLUA_USE_POSIX $LUA_INC -w
  done
  compile "$obj/cJSON.o" "$src/cjson/cJSON.c" -w
  dep=$(ls -t "$here"/native/src/*.h "$here"/native/include/*.h | head -n 1)
  for f in $core; do
    compile "$obj/core_$(basename "$f" .c).o" "$here/native/$f" -std=c11 -D_GNU_SOURCE \
      -DLMOE_BUILDING -I"$here/native/include" -I"$src/include" $WARN -msimd128
  done
  hdr=$dep # loramoe_core.o also when its generated rows changed
  dep=$(ls -t "$hdr" "$out/gen/loramoe_core_rows.h" | head -n 1)
  compile "$obj/loramoe_core.o" "$here/lua/loramoe_core.c" -std=c11 -D_GNU_SOURCE \
    -I"$here/native/include" -I"$out/gen" $LUA_INC $WARN
  dep=$hdr
  for f in main adapter checkpoint; do
    compile "$obj/cli_$f.o" "$here/cli/$f.c" -std=c11 -D_GNU_SOURCE \
      -I"$here/native/include" $LUA_INC $WARN \
      '-DLMOE_LUA_BUILD_DIR=""' '-DLMOE_LUA_SOURCE_DIR="/loramoe/lua"' '-DLMOE_LUA_INSTALL_DIR=""'
  done
  compile "$obj/host.o" "$here/wasm/host.c" -std=c11 -D_GNU_SOURCE \
    -I"$here/native/include" $LUA_INC $WARN
  for j in $jobs; do wait "$j"; done

  # The pure-Lua half of the binding, in the module's file system at /loramoe/lua.
  echo "  LD $name/loramoe.mjs"
  "$EMCC" $OPT $cflags $ldflags "$obj"/*.o -o "$out/$name/loramoe.mjs" \
    --embed-file "$here/lua/loramoe@/loramoe/lua/loramoe" \
    -sMODULARIZE=1 -sEXPORT_ES6=1 -sEXPORT_NAME=createLoramoe \
    -sENVIRONMENT=web,worker,node -sALLOW_MEMORY_GROWTH=1 -sMAXIMUM_MEMORY=4GB \
    -sTOTAL_STACK=1MB -sINVOKE_RUN=0 -sEXIT_RUNTIME=0 -sFORCE_FILESYSTEM=1 \
    -sEXPORTED_FUNCTIONS=_main,_malloc,_free,_lmoe_wasm_new,_lmoe_wasm_run,_lmoe_wasm_close,_lmoe_wasm_text,_lmoe_wasm_threads,_fflush \
    -sEXPORTED_RUNTIME_METHODS=FS,NODEFS,ENV,callMain,ccall,cwrap,UTF8ToString,stringToUTF8,lengthBytesUTF8 \
    --extern-pre-js "$here/wasm/node-shim.js" -lnodefs.js
}

build_variant st "" ""
# A pool of workers made before main runs: pthread_create from a thread that then blocks
# (the cpu backend's pool) cannot wait for a worker to be started later.
build_variant mt "-pthread" "-sPTHREAD_POOL_SIZE=Module.loramoeThreads||4 -sPTHREAD_POOL_SIZE_STRICT=2"
cp "$here/wasm/loramoe.mjs" "$here/wasm/node-runner.mjs" "$out/"
# `build-wasm/loramoe run SCRIPT ...`, as the native command.
printf '#!/bin/sh\nexec node "$(dirname "$0")/node-runner.mjs" "$@"\n' > "$out/loramoe"
chmod +x "$out/loramoe"
echo "wasm/build.sh: built $out/st and $out/mt"
