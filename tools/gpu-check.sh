#!/usr/bin/env bash
# The one script for a machine WITH a GPU (e.g. a lent H200): self-test, the paper-scale KD step
# with both kernel sets (and profiled by op), and the PyTorch peer, each result as JSON lines
# under $OUT.
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
# Few files: a lent machine's tool brings back only a handful (the first run lost the peer's).
step() {  # name, timeout seconds, command...
  local name=$1 secs=$2; shift 2
  echo "== $name" | tee -a "$out/log.txt" >&2
  echo "{\"step\": \"$name\"}" >> "$out/results.jsonl"
  if ! timeout "$secs" "$@" >> "$out/results.jsonl" 2>> "$out/log.txt"; then
    echo "FAIL $name (see $out/log.txt)" | tee -a "$out/log.txt" >&2; status=1
  fi
}
nvidia-smi >> "$out/log.txt" 2>&1 || true
# Most informative first (a lent machine's time is short): pocl's CUDA kernels against the CPU,
# the paper-scale step on them, the same step profiled by op (`--profile`: where the time goes),
# the peer, the f32 student, the portable set, the demo. Timeouts sum to 540 s (the tool's limit
# is 600 s a call), about 1.5x the durations measured on an H200 (2026-11-30): doctor 17 s,
# each bench ~40 s, the peer ~40 s, the demo 82 s, the portable doctor 5 s.
step doctor-fused 40 "$bin" doctor --device cuda --kernels fused
step bench-fused 60 "$bin" bench kd-step --device cuda --kernels fused --workload large --reps 3
step bench-fused-profile 60 "$bin" bench kd-step --device cuda --kernels fused --workload large --reps 2 --profile
step peer 60 python3 "$peer" kd-step-large
step bench-fused-f32-student 60 "$bin" bench kd-step --device cuda --kernels fused --workload large --reps 3 --student-precision f32
step bench-portable 60 "$bin" bench kd-step --device cuda --kernels portable --workload large --reps 3
step demo 160 sh -c "'$bin' demo --device cuda --kernels fused --out '$out/demo' >&2 && cp '$out/demo/report.md' '$out/demo-report.md' && rm -rf '$out/demo' && echo '{\"demo\": \"demo-report.md\"}'"
step doctor 40 "$bin" doctor --device cuda
cat "$out/results.jsonl"
exit $status
