#!/bin/sh
# Install-tree test: configure and install loramoe into a temporary prefix, then build
# examples/host against that prefix twice, with find_package(loramoe) and with
# pkg-config, and run it each time. Also checks that the installed Lua files load, and
# (when luarocks is installed) that `luarocks make` builds and installs the rock.
#
#   examples/host/test-install.sh            (CPU-only build of the library, fast)
#   LMOE_CMAKE_ARGS="-DLMOE_CUDA=ON" JOBS=8 examples/host/test-install.sh
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/loramoe-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
jobs=${JOBS:-2}
prefix="$tmp/prefix"

echo "== configure, build and install loramoe into $prefix"
# shellcheck disable=SC2086  # LMOE_CMAKE_ARGS is a list of words
cmake -S "$root" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DLMOE_TESTS=OFF -DLMOE_BENCH=OFF ${LMOE_CMAKE_ARGS:--DLMOE_CUDA=OFF} >"$tmp/configure.log" ||
  { cat "$tmp/configure.log"; exit 1; }
cmake --build "$tmp/build" -j "$jobs" >"$tmp/build.log" 2>&1 || { tail -50 "$tmp/build.log"; exit 1; }
cmake --install "$tmp/build" >"$tmp/install.log" || { cat "$tmp/install.log"; exit 1; }

pc=$(find "$prefix" -name loramoe.pc | head -n 1)
cfg=$(find "$prefix" -name loramoeConfig.cmake | head -n 1)
[ -n "$pc" ] || { echo "FAIL: no loramoe.pc installed"; exit 1; }
[ -n "$cfg" ] || { echo "FAIL: no loramoeConfig.cmake installed"; exit 1; }
for f in init.lua experiment.lua report.lua svg.lua; do
  [ -f "$prefix/share/lua/5.4/loramoe/$f" ] || { echo "FAIL: share/lua/5.4/loramoe/$f not installed"; exit 1; }
done

echo "== the installed Lua module loads from the prefix alone"
libdir=$(dirname "$(dirname "$pc")")
# one copy of the library in a process: the module uses the installed shared library
objdump -p "$libdir/lua/5.4/loramoe/core.so" | grep -q 'NEEDED.*libloramoe\.so' ||
  { echo "FAIL: core.so does not link libloramoe.so"; exit 1; }
LUA_PATH="$prefix/share/lua/5.4/?.lua;$prefix/share/lua/5.4/?/init.lua" \
LUA_CPATH="$libdir/lua/5.4/?.so" \
  lua5.4 -e 'local lm = require "loramoe"; local e = require "loramoe.experiment"
             assert(lm.version() == lm._VERSION, "version"); print("lua5.4: loramoe " .. lm.version())'

for how in config pkgconfig; do
  echo "== examples/host with LORAMOE_FIND=$how"
  PKG_CONFIG_PATH="$(dirname "$pc")${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
    cmake -S "$root/examples/host" -B "$tmp/host-$how" -DLORAMOE_FIND=$how \
      -DCMAKE_PREFIX_PATH="$prefix" >"$tmp/host-$how.log" || { cat "$tmp/host-$how.log"; exit 1; }
  cmake --build "$tmp/host-$how" -j "$jobs" >>"$tmp/host-$how.log" 2>&1 || { cat "$tmp/host-$how.log"; exit 1; }
  grep "host: loramoe found in $prefix" "$tmp/host-$how.log" >/dev/null ||
    { echo "FAIL: the host did not find loramoe in the prefix"; cat "$tmp/host-$how.log"; exit 1; }
  "$tmp/host-$how/loramoe_host" --frames 24 --backend "${HOST_BACKEND:-cpu}"
done
# The rockspec: `luarocks make` from the checkout into a private tree, for Lua 5.4 (the
# C module), then load it with nothing but the tree's paths.
if command -v luarocks >/dev/null 2>&1; then
  echo "== luarocks make (Lua 5.4) into a temporary tree"
  (cd "$root" && luarocks --lua-version 5.4 make --tree "$tmp/rocks" \
     LORAMOE_CMAKE_ARGS="${LMOE_CMAKE_ARGS:--DLMOE_CUDA=OFF}" loramoe-0.1.0-1.rockspec) \
     >"$tmp/rock.log" 2>&1 || { tail -40 "$tmp/rock.log"; exit 1; }
  (eval "$(luarocks --lua-version 5.4 --tree "$tmp/rocks" path)" && cd "$tmp" &&
   lua5.4 -e 'local lm = require "loramoe"
              local core = package.searchpath("loramoe.core", package.cpath)
              assert(core:find("rocks", 1, true), core)
              -- the module loaded the libloramoe of the rock, not one of the build tree
              local maps = io.open("/proc/self/maps"):read("a")
              local lib = maps:match("(%S*libloramoe%.so[%.%d]*)\n")
              assert(lib and lib:find("rocks", 1, true), "libloramoe loaded from " .. tostring(lib))
              local r = require("loramoe.experiment").run({ backend = "cpu", preset = "tiny",
                layers = 1, tokens = 16, requests = 2, reps = 1, warmup = 0 }, { progress = false })
              print("rock: loramoe " .. lm.version() .. ", one forward in " .. r.time_ms .. " ms")')
else
  echo "NOTE: luarocks is not installed; the rockspec was not tested (apt-get install luarocks)"
fi
echo "install test: ok"
