#!/usr/bin/env bash
# The one script for a machine WITH a GPU (e.g. a lent H200): self-test, the paper-scale KD step
# with both kernel sets, and the PyTorch peer, each result as JSON lines under $OUT. Prepared
# without a GPU; not yet run on one.
#
#   OUT=out POCL_BIN=./pocl PEER=../shared/bench/peer_torch.py tools/gpu-check.sh
#
# The CUDA libraries come from the PyTorch install's nvidia/cu13/lib (or CUDA_LIB): never the
# build machine's libcuda stub.
set -uo pipefail
out=${OUT:-gpu-out}
bin=${POCL_BIN:-target-cuda/release/pocl}
peer=${PEER:-../shared/bench/peer_torch.py}
mkdir -p "$out"
lib=${CUDA_LIB:-$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)}
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
case "$LD_LIBRARY_PATH" in *stubs*) echo "refusing: a stubs/ directory is on LD_LIBRARY_PATH" >&2; exit 2 ;; esac
status=0
step() {  # name, timeout seconds, command...
  local name=$1 secs=$2; shift 2
  echo "== $name" >&2
  if ! timeout "$secs" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"; then
    echo "FAIL $name (see $out/$name.err)" >&2; status=1
  fi
}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
step doctor 180 "$bin" doctor --device cuda
step doctor-fused 180 "$bin" doctor --device cuda --kernels fused
step bench-portable 150 "$bin" bench kd-step --device cuda --kernels portable --workload large --reps 5
step bench-fused 150 "$bin" bench kd-step --device cuda --kernels fused --workload large --reps 5
step peer 150 python3 "$peer" kd-step-large
exit $status
