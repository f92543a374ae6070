#!/usr/bin/env bash
# Compiles every CUDA kernel of pocl (src/ops/cuda/*.cu) to PTX and through ptxas for sm_90a
# (H100/H200) and sm_80 (A100), printing register use and spills. Needs no GPU; takes seconds.
# A kernel that does not compile, or that spills registers, fails the check.
#
#   tools/check-cuda-kernels.sh          # installs the pinned toolkit first if needed (cached)
set -euo pipefail
cd "$(dirname "$0")/.."
# Always the pinned toolkit (installed once, then only its exports), never another nvcc on PATH.
exports=$(tools/cuda-toolkit.sh)  # a failed install stops here (set -e)
eval "$exports"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for cu in src/ops/cuda/*.cu; do
  name=$(basename "$cu" .cu)
  for arch in sm_90a sm_80; do
    ptx="$tmp/$name.$arch.ptx"
    if ! nvcc --ptx -O3 -std=c++17 -arch="$arch" -o "$ptx" "$cu"; then
      echo "FAIL $cu ($arch): nvcc" >&2; status=1; continue
    fi
    if ! out=$(ptxas -arch="$arch" -v -o /dev/null "$ptx" 2>&1); then
      echo "$out" >&2; echo "FAIL $cu ($arch): ptxas" >&2; status=1; continue
    fi
    # ptxas -v prints, per kernel: "Compiling entry function 'X'", then registers and spills.
    echo "$out" | awk -v f="$name" -v a="$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
      /spill stores/ { split($0, s, ","); spill = s[2] }
      /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); printf "ok   %-8s %-7s %-22s %s,%s\n", f, a, k, substr($0, RSTART, RLENGTH), spill }'
    if echo "$out" | grep -qE '[1-9][0-9]* bytes spill (stores|loads)'; then
      echo "FAIL $cu ($arch): register spills" >&2; status=1
    fi
  done
done
exit $status
