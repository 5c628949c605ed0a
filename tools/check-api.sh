#!/usr/bin/env bash
# Checks that every LMOE_API function of the public header is
#   (a) a function of the raw Lua cores: without its lmoe_ prefix, in the list
#       core_functions of spec/api_spec.lua, which that spec holds the C module
#       (lua5.4) and the FFI binding (luajit) to, by what each exposes at run time
#       (it also checks that every header function is reachable through the core);
#       or the release or close of a kind of box (core.close), or the init of a
#       struct (lmoe_X_init, lmoe_X_init_sized: called where the cores fill it);
#   (b) documented in docs/api.md            in a heading (a line starting with #);
# and that every environment variable the library reads (getenv("LMOE_...") in native/
# and kernels/) has a row of docs/api.md's table of them.
# Usage: tools/check-api.sh [repo root]. Prints what is missing; exits 1 if anything is.
set -euo pipefail

root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
header=$root/native/include/loramoe.h
spec=$root/spec/api_spec.lua
doc=$root/docs/api.md

for f in "$header" "$spec" "$doc"; do
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

# The core's functions as spec/api_spec.lua lists them: the quoted names between
# "local core_functions = {" and the closing "}".
core_list=$(sed -n '/^local core_functions = {/,/^}/p' "$spec" | grep -oE '"[a-z0-9_]+"' | tr -d '"')
if [ -z "$core_list" ]; then
  echo "check-api: found no core_functions list in ${spec#"$root"/}"
  exit 1
fi
missing=0
for n in "${names[@]}"; do
  problems=()
  case $n in
    *_init | *_init_sized | *_release | *_close) ;;
    *) grep -qx "${n#lmoe_}" <<<"$core_list" ||
         problems+=("not in core_functions of spec/api_spec.lua") ;;
  esac
  grep -qE "^#+(.*[^A-Za-z0-9_])?$n([^A-Za-z0-9_]|$)" "$doc" ||
    problems+=("no heading in docs/api.md")
  if [ "${#problems[@]}" -gt 0 ]; then
    missing=$((missing + 1))
    printf '%s: %s\n' "$n" "$(IFS=';'; echo "${problems[*]}" | sed 's/;/; /g')"
  fi
done

mapfile -t envs < <(grep -rhoE 'getenv\("LMOE_[A-Z0-9_]+"\)' "$root/native" "$root/kernels" |
  grep -oE 'LMOE_[A-Z0-9_]+' | sort -u)
for v in "${envs[@]}"; do
  if ! grep -qE "^\| \`$v\` \|" "$doc"; then
    missing=$((missing + 1))
    printf '%s: no row in docs/api.md'"'"'s table of environment variables\n' "$v"
  fi
done

if [ "$missing" -gt 0 ]; then
  echo "check-api: $missing of ${#names[@]} API functions and ${#envs[@]} environment variables are not bound or documented everywhere"
  exit 1
fi
echo "check-api: all ${#names[@]} API functions are bound in the Lua cores and documented, and the ${#envs[@]} environment variables"
