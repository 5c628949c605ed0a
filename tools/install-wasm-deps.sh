#!/bin/sh
# Installs what the WebAssembly build and its tests need (Debian/Ubuntu), when missing,
# and fetches the C sources of Lua 5.4 and cJSON from Debian's source packages
# (apt-get source) into DIR (default build-wasm/src): they are built into the module, never committed.
#   emscripten  emcc (Debian's clang/lld + binaryen), nodejs for running the module
#   cmake       runs the generator of the Lua C module's rows (lua/gen_core_rows.cmake)
#   dpkg-dev    apt-get source
#   lua-luassert, lua-say, lua-dkjson  pure Lua: what the spec files use under wasm
#   chromium    the browser test (only with --browser): Debian's package. Ubuntu has
#               none (its chromium is a snap): there it fails and says what to do,
#               unless a browser is already there ($CHROMIUM, chromium on PATH, the snap)
# As root it runs apt-get; otherwise it prints the command to run and fails.
set -eu

dir=${1:-build-wasm/src}
browser=0
[ "${2:-}" = "--browser" ] && browser=1

PACKAGES="emscripten nodejs cmake dpkg-dev lua-luassert lua-say lua-dkjson"
[ $browser = 1 ] && PACKAGES="$PACKAGES chromium"

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-wasm-deps: not a Debian-based system; install emscripten and node, and put" >&2
  echo "  the sources of Lua 5.4 and cJSON under $dir/lua and $dir/cjson" >&2
  exit 1
fi

root=0
[ "$(id -u)" -eq 0 ] && root=1
updated=0
apt_update() {
  [ $updated = 1 ] && return 0
  apt-get update
  updated=1
}

missing=""
for p in $PACKAGES; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] && continue
  # any node will do (a distribution's or one installed by other means)
  [ "$p" = nodejs ] && command -v node >/dev/null 2>&1 && continue
  # any Chromium that starts will do, as tests/web/run.mjs finds it (Ubuntu's
  # chromium-browser is a stub that asks for the snap: it fails here)
  if [ "$p" = chromium ]; then
    for b in "${CHROMIUM:-}" chromium chromium-browser /snap/bin/chromium; do
      [ -n "$b" ] && "$b" --version >/dev/null 2>&1 && continue 2
    done
  fi
  missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ $root = 0 ]; then
    echo "install-wasm-deps: missing packages; run:" >&2
    echo "sudo apt-get install -y --no-install-recommends$missing" >&2
    exit 1
  fi
  echo "install-wasm-deps: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt_update
  case " $missing " in *" chromium "*)
    candidate=$(apt-cache policy chromium 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
      echo "install-wasm-deps: no 'chromium' package here (Ubuntu ships Chromium only as a snap):" >&2
      echo "  install one (snap install chromium) or set CHROMIUM to a Chromium or Chrome binary" >&2
      exit 1
    fi
  esac
  apt-get install -y --no-install-recommends $missing
fi

# ---------------------------------------------------------------- sources
# Source entries: the distribution's own deb822 stanzas again with Types: deb-src.
enable_deb_src() {
  out=/etc/apt/sources.list.d/loramoe-deb-src.sources
  [ -f "$out" ] && return 0
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; ORS = "\n\n" }
         /Types:[^\n]*deb/ && /URIs:[^\n]*(debian|ubuntu)/ && !/deb-src/ {
           sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f"
  done > "$out.tmp"
  if [ -f /etc/apt/sources.list ]; then
    grep -E '^deb [^#]*(debian|ubuntu)' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
      > /etc/apt/sources.list.d/loramoe-deb-src.list || true
  fi
  mv "$out.tmp" "$out"
  updated=0
}

fetch_source() { # fetch_source PACKAGE SUBDIR: the unpacked source (Debian's patches applied)
  pkg=$1 sub=$2
  [ -f "$dir/$sub/.complete" ] && return 0
  rm -rf "$dir/$sub" "$dir/dl-$sub"
  mkdir -p "$dir/dl-$sub"
  get() { (cd "$dir/dl-$sub" && apt-get source "$pkg"); }
  if ! get >/dev/null 2>&1; then
    if [ $root = 0 ]; then
      echo "install-wasm-deps: apt-get source $pkg failed: enable deb-src entries (as root" >&2
      echo "  this script does it) and run apt-get update" >&2
      exit 1
    fi
    enable_deb_src
    apt_update
    get
  fi
  src=$(find "$dir/dl-$sub" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  mv "$src" "$dir/$sub"
  rm -rf "$dir/dl-$sub"
  touch "$dir/$sub/.complete"
}

fetch_source lua5.4 lua
fetch_source cjson cjson
