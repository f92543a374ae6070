"""Fixtures for tests/realmodels.rs (issue 14): Llama 3 rope scaling and students pruned from a
teacher. Reuses tools/make_fixtures.py (its float64 attention, seeded weights, reference format)
and the llama test tokenizer it wrote. Run by hand from the repository root:

    python tools/make_realmodel_fixtures.py

Needs torch and transformers 5 (no network). Writes tests/fixtures/realmodels/:
  * llama3-rope/: a 3-layer LlamaForCausalLM with rope_parameters.rope_type = "llama3", chosen so
    that the three frequency bands (kept, interpolated, divided by factor) all occur for head_dim 16
    (wavelengths 6.3, 19.9, 62.8, 199, ... against high/low wavelengths 16 and 64), bf16 weights,
    reference.safetensors as in tests/fixtures/models (float64 transformers logits);
  * llama3-rope/pruned_0_2.safetensors: float64 transformers logits of the same model with only
    layers 0 and 2 kept (`seq_ids`, `seq_logits`), the reference for `pocl init --from`.
The script checks that the llama3 logits differ from those of the unscaled rope by far more than
the tests' 1e-4 tolerance (else the fixture could not tell the two apart).
"""
import copy, sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

OUT = mf.ROOT / "tests/fixtures/realmodels"


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_llama3_rope():
    tok = Tokenizer.from_file(str(mf.TOK_DIR / "llama/tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    V = mf.round_up(n)
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = mf.llama_config(V, rope_parameters=dict(llama3), num_hidden_layers=3, max_position_embeddings=512)
    model = mf.build(mf.LlamaForCausalLM, cfg, seed=41)
    d = OUT / "llama3-rope"
    if d.exists():
        mf.shutil.rmtree(d)
    d.mkdir(parents=True)
    mf.save_hf(model, d, torch.bfloat16)  # bf16 halves the fixture; the reference uses the rounded weights
    mf.shutil.copy(mf.TOK_DIR / "llama/tokenizer.json", d / "tokenizer.json")
    m64 = mf.rounded_f64(model, torch.bfloat16)
    ref, _ = mf.make_reference(m64, n, seed=1041)
    # Longer sequence too: positions up to 200 make the scaled low frequencies matter more (only
    # the last 16 rows of logits are stored, to keep the fixture small).
    g = torch.Generator().manual_seed(7)
    long_ids = torch.randint(3, n, (1, 200), generator=g)
    with torch.no_grad():
        ref["long_ids"] = long_ids
        ref["long_logits"] = m64(long_ids).logits[0, -16:].float().contiguous()
    save_file(ref, str(d / "reference.safetensors"), metadata={"format": "pt"})

    # The same weights with the default rope must give clearly different logits.
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = mf.LlamaForCausalLM(plain_cfg).to(torch.float64)
    plain.load_state_dict(m64.state_dict())
    plain.set_attn_implementation(mf.ATTN)
    plain.eval()
    with torch.no_grad():
        diff = rel(plain(long_ids).logits[0, -16:].float(), ref["long_logits"])
    print(f"llama3 vs default rope logits: rel diff {diff:.3g}")
    assert diff > 1e-2, diff

    # A student pruned to layers 0 and 2 (what `pocl init --from --keep-layers 2` keeps).
    pruned = copy.deepcopy(m64)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[0], pruned.model.layers[2]])
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    pruned.config.num_hidden_layers = 2
    seq = ref["seq_ids"]
    with torch.no_grad():
        pl = pruned(seq).logits[0].float().contiguous()
    assert rel(pl, ref["seq_logits"]) > 1e-2
    save_file({"seq_ids": seq, "seq_logits": pl}, str(d / "pruned_0_2.safetensors"), metadata={"format": "pt"})
    print(f"wrote {d}")


def main():
    torch.use_deterministic_algorithms(True)
    make_llama3_rope()


if __name__ == "__main__":
    main()
