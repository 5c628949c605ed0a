#!/bin/bash
# Compiles the GEMM engines for sm_90a and fails on what ptxas says costs speed: a
# "Potential Performance Loss" remark (e.g. wgmma serialised because a function call
# sits in the kernel, setmaxnreg ignored) or register spills. ctest runs it where nvcc
# is found (test ptxas_remarks).
#   bash tools/check-ptxas.sh [nvcc]
set -u
nvcc=${1:-nvcc}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for f in gemm_sm90.cu gemm_sm80.cu gemm_sm90_fp8.cu; do
  out=$("$nvcc" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DLMOE_SM90A -Xptxas -v \
    -I"$root/kernels" -c "$root/kernels/$f" -o "$tmp/$f.o" 2>&1) || { echo "$out" | grep -E "error" | head; fail=1; continue; }
  remarks=$(echo "$out" | grep -c "Potential Performance Loss")
  spills=$(echo "$out" | grep -E "bytes spill (stores|loads)" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
  kernels=$(echo "$out" | grep -c "Compiling entry function")
  echo "$f: $kernels kernels, $remarks performance remarks, $spills with spills"
  if [ "$remarks" != 0 ] || [ "$spills" != 0 ]; then
    echo "$out" | grep -E "Potential Performance Loss|[1-9][0-9]* bytes spill" | sort | uniq -c | head -10
    fail=1
  fi
done
exit $fail
