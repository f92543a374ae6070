#!/usr/bin/env bash
# Builds pocl as it runs on a CPU with AVX2 + FMA but no AVX-512, on an AVX-512 machine: a
# measuring aid for PERFORMANCE.md ("An AVX2-only CPU, simulated"), never shipped or tested.
#
#   tools/simulate-avx2.sh [REV]     (default HEAD)
#
# In a git worktree of REV (SIM_DIR, default /tmp/pocl-avx2-sim; own target dir SIM_DIR-target),
# it compiles out the `gemm` crate's AVX-512 kernels (feature x86-v4), makes our CPU checks see
# no AVX-512 (the bf16 kernels, f32 panels, the skinny tiles, every `simd::multiversion` loop
# at its AVX2 copy), then builds `pocl` and the matmul benches in release. Each patch checks
# that it applied, so a changed source fails here instead of measuring the real CPU.
# The CPU still runs the AVX2 code on its own cores: a Zen 4 runs 256-bit FMAs at the same
# rate as 512-bit ones, so this shows code paths and ratios, not another CPU's speed.
set -euo pipefail
rev=${1:-HEAD}
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
sim=${SIM_DIR:-/tmp/pocl-avx2-sim}
patched="Cargo.toml src/ops/bf16/cpu.rs src/ops/simd.rs"
git -C "$root" worktree prune
if [ -e "$sim" ]; then
    # Replaced only if it is a simulation this script made: a detached worktree whose only
    # changes are the patches below. Anything else there is left alone.
    changed=$( (git -C "$sim" status --porcelain 2>/dev/null || true) | awk '{print $2}' | sort | tr '\n' ' ')
    if [ "$(git -C "$sim" rev-parse --show-toplevel 2>/dev/null)" != "$sim" ] ||
        git -C "$sim" symbolic-ref -q HEAD >/dev/null ||
        [ "$changed" != "$(echo $patched | tr ' ' '\n' | sort | tr '\n' ' ')" ]; then
        echo "simulate-avx2: $sim exists and is not an unchanged simulation; set SIM_DIR" >&2
        exit 1
    fi
    git -C "$sim" checkout -q -- .
    git -C "$root" worktree remove "$sim"
fi
git -C "$root" worktree add --detach "$sim" "$rev" >/dev/null
cd "$sim"
python3 - <<'EOF'
import re

def patch(path, old, new):
    text = open(path).read()
    if old not in text:
        raise SystemExit(f"simulate-avx2: {path}: the text to patch is gone: {old!r}")
    open(path, "w").write(text.replace(old, new))

patch("Cargo.toml", 'features = ["x86-v4"]', "features = []")
patch("src/ops/bf16/cpu.rs",
      '*AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))', "false")
patch("src/ops/bf16/cpu.rs",
      'is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")', "false")
# Outside tests `forced()` returns None; the simulation forces the AVX2 copies everywhere.
text = open("src/ops/simd.rs").read()
new, n = re.subn(r"#\[cfg\(not\(test\)\)\]\s*\{\s*None\s*\}",
                 "#[cfg(not(test))]\n    {\n        Some(Level::Avx2)\n    }", text)
if n != 1:
    raise SystemExit("simulate-avx2: src/ops/simd.rs: forced() outside tests not found")
open("src/ops/simd.rs", "w").write(new)
EOF
export CARGO_TARGET_DIR="$sim-target"
cargo build --release --quiet
cargo bench --no-run --quiet --bench bf16_matmul --bench skinny
echo "simulated AVX2-only build of $(git rev-parse --short HEAD):"
echo "  pocl:  $CARGO_TARGET_DIR/release/pocl"
for bench in bf16_matmul skinny; do
    for f in "$CARGO_TARGET_DIR"/release/deps/"$bench"-*; do
        case "$f" in *.d) ;; *) echo "  bench: $f" ;; esac
    done
done
