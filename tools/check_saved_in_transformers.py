"""Checks that directories saved by pocl load in transformers and give the reference logits.

For every fixture model: `pocl convert` (pocl's load + save, as training checkpoints are written),
then AutoModelForCausalLM.from_pretrained on the result, float64, and the logits of `seq_ids`
compared with the fixture's reference. Run by hand (needs torch + transformers):
    cargo build --release && python tools/check_saved_in_transformers.py
"""
import pathlib, subprocess, sys, tempfile
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = pathlib.Path(__file__).resolve().parent.parent
pocl = root / "target/release/pocl"
models = ["gpt2", "gpt2-hub", "opt", "opt-350m", "llama", "llama-v4", "qwen2", "qwen3", "mistral"]
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    for name in models:
        src = root / "tests/fixtures/models" / name
        out = pathlib.Path(tmp) / name
        subprocess.run([pocl, "convert", "--model", src, "--out", out], check=True, capture_output=True)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
        ref = load_file(src / "reference.safetensors")
        with torch.no_grad():
            logits = model(ref["seq_ids"]).logits[0]
        want = ref["seq_logits"].double()
        err = ((logits - want).abs().max() / want.abs().max()).item()
        worst = max(worst, err)
        print(f"{name:10s} loads in transformers, rel err {err:.2e}")
print("worst", worst)
sys.exit(0 if worst < 1e-4 else 1)
