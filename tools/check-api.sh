#!/usr/bin/env bash
# Checks that every LMOE_API function of the public header is
#   (a) called in the Lua 5.4 C module       lua/loramoe_core.c
#   (b) used by the LuaJIT FFI binding       as C.<name> or lib.<name> in lua/loramoe/**/*.lua
#   (c) documented in docs/api.md            in a heading (a line starting with #)
# A binding that leaves a function out on purpose says so in a comment that contains
# "not bound: <name>" (with the reason); that counts as bound.
# lmoe_X_init_sized is what the header's macro lmoe_X_init(p) calls: a C call written
# lmoe_X_init(...) counts for it in (a), and in (b) a binding's use of the symbol
# lmoe_X_init (the 0.1.0-size init, docs/api.md "Struct sizes") counts for it too.
# Usage: tools/check-api.sh [repo root]. Prints what is missing; exits 1 if anything is.
set -euo pipefail

root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
header=$root/native/include/loramoe.h
core=$root/lua/loramoe_core.c
ffidir=$root/lua/loramoe
doc=$root/docs/api.md

for f in "$header" "$core" "$ffidir" "$doc"; do
  [ -e "$f" ] || { echo "check-api: missing ${f#"$root"/}"; exit 1; }
done

# Function names declared with LMOE_API (the name is on the line that has LMOE_API).
mapfile -t names < <(grep -v '#define' "$header" |
  grep -oE 'LMOE_API[^(]*[^A-Za-z0-9_]lmoe_[a-z0-9_]+[[:space:]]*\(' |
  grep -oE 'lmoe_[a-z0-9_]+[[:space:]]*\($' | tr -d ' \t(' | sort -u)
if [ "${#names[@]}" -eq 0 ]; then
  echo "check-api: found no LMOE_API functions in ${header#"$root"/}"
  exit 1
fi

ffi_files=$(find "$ffidir" -name '*.lua' | sort)
missing=0
for n in "${names[@]}"; do
  problems=()
  alt=$n # the name whose use counts as well
  case $n in *_init_sized) alt=${n%_sized} ;; esac
  grep -qE "(^|[^A-Za-z0-9_])($n|$alt)[[:space:]]*\(|not bound: $n([^A-Za-z0-9_]|$)" "$core" ||
    problems+=("not called in lua/loramoe_core.c")
  # shellcheck disable=SC2086
  grep -qE "(^|[^A-Za-z0-9_])(C|lib)\.($n|$alt)([^A-Za-z0-9_]|$)|not bound: $n([^A-Za-z0-9_]|$)" $ffi_files /dev/null ||
    problems+=("not used as C.$n or lib.$n in lua/loramoe/*.lua")
  grep -qE "^#+(.*[^A-Za-z0-9_])?$n([^A-Za-z0-9_]|$)" "$doc" ||
    problems+=("no heading in docs/api.md")
  if [ "${#problems[@]}" -gt 0 ]; then
    missing=$((missing + 1))
    printf '%s: %s\n' "$n" "$(IFS=';'; echo "${problems[*]}" | sed 's/;/; /g')"
  fi
done

if [ "$missing" -gt 0 ]; then
  echo "check-api: $missing of ${#names[@]} API functions are not bound or documented everywhere"
  exit 1
fi
echo "check-api: all ${#names[@]} API functions are bound in both bindings and documented"
