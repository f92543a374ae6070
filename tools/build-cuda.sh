#!/usr/bin/env bash
# Builds the CUDA binary, `${CARGO_TARGET_DIR:-target-cuda}/release/pocl`, from a fresh machine:
# installs the pinned toolkit (cached), builds with `--features cuda` for CUDA_COMPUTE_CAP
# (default 90: H100/H200; 80 for A100), and, on a machine without a GPU, checks that the binary
# starts (with the libcuda stub on LD_LIBRARY_PATH, for this check only) and refuses
# `--device cuda` with one line. Not part of .ci/run: see README, "GPU", for why (build time).
set -euo pipefail
cd "$(dirname "$0")/.."
exports=$(tools/cuda-toolkit.sh)  # a failed install stops here (set -e)
eval "$exports"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
target=${CARGO_TARGET_DIR:-target-cuda}
CARGO_TARGET_DIR="$target" cargo build --release --features cuda
bin="$target/release/pocl"
echo "built $bin (compute capability $CUDA_COMPUTE_CAP)"
if command -v nvidia-smi >/dev/null 2>&1; then
  exit 0  # a GPU machine: never run with the stub here
fi
stub_path="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib"
LD_LIBRARY_PATH="$stub_path" "$bin" --version
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if LD_LIBRARY_PATH="$stub_path" "$bin" forward --model tests/fixtures/models/gpt2 --ids 1,2 \
    --output "$tmp/out.json" --device cuda 2> "$tmp/err"; then
  echo "FAIL: --device cuda succeeded without a GPU" >&2; exit 1
fi
cat "$tmp/err"
if [ "$(wc -l < "$tmp/err")" != 1 ] || ! grep -q "^error: cannot open CUDA device 0" "$tmp/err"; then
  echo "FAIL: expected one line 'error: cannot open CUDA device 0 ...'" >&2; exit 1
fi
echo "ok: the CUDA build starts without a GPU and refuses --device cuda with one line"
