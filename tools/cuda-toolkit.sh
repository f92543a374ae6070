#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolkit from PyPI wheels (no system CUDA, no root) into a cache
# directory, so that `cargo build --release --features cuda` and tools/check-cuda-kernels.sh work on a
# machine without a GPU. Idempotent: when the cache is complete it only prints the environment.
#
#   tools/cuda-toolkit.sh                 # install (once), then print the `export` lines
#   eval "$(tools/cuda-toolkit.sh)"       # install and set the environment of this shell
#   tools/cuda-toolkit.sh --env-file F    # also write the exports to F (for `source F`)
#
# Cache: ${POCL_CUDA_HOME:-$HOME/.cache/pocl/cuda-13.0}. Progress goes to stderr, exports to stdout.
#
# Pinned to 13.0.x on purpose: the GPU machines we target run driver 580 (CUDA 13.0), and PTX from a
# newer nvcc does not load on an older driver.
#
# The libcuda stub: libcuda.so.1 is the DRIVER, which only exists on a machine with a GPU. The linker
# needs one and a CUDA build needs one to start, so we make a stub (every cu* symbol returns error
# 999) under $CUDA_HOME/lib/stubs/. It is for building and for starting a CUDA binary on a CPU-only
# machine (where every CUDA call then fails cleanly). NEVER put stubs/ on LD_LIBRARY_PATH of, or copy
# it to, a GPU machine: it would shadow the real driver. The exports below put it on LIBRARY_PATH
# (link time) only.
set -euo pipefail

env_file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --env-file) env_file="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "cuda-toolkit.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

prefix="${POCL_CUDA_HOME:-$HOME/.cache/pocl/cuda-13.0}"
root="$prefix/nvidia/cu13"
stamp="$prefix/.pocl-complete"
# Bump when the pins or the post-install steps change: an older cache is then rebuilt.
pins=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)
want="v1 ${pins[*]}"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "cuda-toolkit.sh: installing CUDA 13.0 wheels into $prefix (about 1.2 GB)" >&2
  rm -rf "$prefix"
  mkdir -p "$prefix"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix" "${pins[@]}" >&2

  # Unversioned names for the linker (the wheels ship only lib*.so.N).
  cd "$root/lib"
  for l in cudart cublas cublasLt nvrtc curand; do
    so=$(ls "lib$l.so."[0-9]* | head -1)
    ln -sf "$so" "lib$l.so"
  done

  # The driver stub (see the header): one function per cu* name in cuda.h, each returning 999.
  mkdir -p stubs
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u \
    | sed 's/.*/int &(void){return 999;}/' > stubs/stub.c
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/stub.c
  ln -sf libcuda.so stubs/libcuda.so.1
  rm stubs/stub.c
  cat > stubs/README <<'TXT'
libcuda.so here is a STUB made by pocl's tools/cuda-toolkit.sh: every driver call returns error 999.
It exists to link and to start CUDA builds on machines without a GPU. Never ship it to, or put it on
LD_LIBRARY_PATH of, a machine with a GPU: it would hide the real driver.
TXT
  cd - >/dev/null

  "$root/bin/nvcc" --version >/dev/null  # a broken install fails here, before the stamp
  echo "$want" > "$stamp"
  echo "cuda-toolkit.sh: done" >&2
fi

exports="export CUDA_HOME='$root'
export CUDA_ROOT='$root'
export NVCC='$root/bin/nvcc'
export PATH='$root/bin':\"\$PATH\"
export LIBRARY_PATH='$root/lib:$root/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
echo "$exports"
if [ -n "$env_file" ]; then
  printf '%s\n' "$exports" > "$env_file.tmp" && mv "$env_file.tmp" "$env_file"
fi
