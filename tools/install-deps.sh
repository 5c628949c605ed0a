#!/bin/sh
# Installs the Debian/Ubuntu packages that building and testing loramoe needs, when
# some are missing. As root it runs apt-get; otherwise it prints the command to run
# and fails. The names are the same on Debian 12 and Ubuntu 24.04 (universe).
# CUDA is optional and not installed here: the build uses nvcc when it finds one.
set -eu

# clang and libclang-rt-dev: the libFuzzer target; luarocks: the rockspec test.
PACKAGES="cmake make gcc pkg-config lua5.4 liblua5.4-dev luajit libluajit-5.1-dev lua-busted libcjson-dev clang libclang-rt-dev luarocks"

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: not a Debian-based system; make sure these (or your distribution's" >&2
  echo "  equivalents) are installed: $PACKAGES" >&2
  exit 0
fi

missing=""
for p in $PACKAGES; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  echo "install-deps: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends $missing
else
  echo "install-deps: missing packages; run:" >&2
  echo "sudo apt-get install -y --no-install-recommends$missing"
  exit 1
fi
