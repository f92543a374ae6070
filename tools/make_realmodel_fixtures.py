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
  * gguf/: tiny GGUF files of each architecture and tensor type (see below), and llama3.gguf, a
    Llama 3.1-style rope stored only as llama.cpp's rope_freqs tensor (`... llama3-gguf` writes
    just that one).
The script checks that the llama3 logits differ from those of the unscaled rope by far more than
the tests' 1e-4 tolerance (else the fixture could not tell the two apart).
"""
import copy, math, sys
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


# ------------------------------------------------------------------------------------------
# GGUF: tiny models of each architecture whose matrices cycle through every tensor type pocl
# reads, written with gguf-py as llama.cpp's converter writes them (llama q/k rows permuted), and
# float64 references from transformers' own GGUF loader (the weights as the file holds them).
# ------------------------------------------------------------------------------------------
import json
import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, AutoTokenizer

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]

# Byte offsets of the f16 scales in each K-quant block (gguf-py has no K-quant quantizer, so blocks
# are random bytes with these scales set to small finite values).
K_SCALES = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def encode_tensor(w, qtype, rng):
    """(bytes or array for GGUFWriter.add_tensor, raw_dtype)."""
    w = w.astype(np.float32)
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nblocks = w.size // block
        raw = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
        for off in K_SCALES[qtype]:
            raw[:, off:off + 2] = np.frombuffer(
                np.float16(rng.uniform(0.002, 0.02, nblocks)).astype(np.float16).tobytes(), np.uint8).reshape(nblocks, 2)
        return raw.reshape(w.shape[0], -1), qtype
    return gguf.quants.quantize(w, qtype), qtype


def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, model, tok_kind, pre, offset, embd_type, rng, f32_only=False, extra=None):
    c = model.config
    tj = json.loads((mf.TOK_DIR / tok_kind / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    tokens, types = [None] * n, [1] * n
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    for a in tj["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    eos = tokens.index("<|endoftext|>") if "<|im_end|>" not in tokens else tokens.index("<|im_end|>")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(eos)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    used, k = [], offset
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if hf in names:
            name = names[hf]
        else:
            layer, rest = hf[len("model.layers."):].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{parts[base]}.{kind}"
        t = p.detach().float().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            t = permute(t, c.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k.weight"):
            t = permute(t, c.num_key_value_heads)
        qtype = Q.F32
        if f32_only:
            pass
        elif name == "token_embd.weight":
            qtype = embd_type  # the two vocabulary matrices are the largest: always quantized
        elif name == "output.weight":
            qtype = Q.Q6_K
        elif t.ndim == 2:
            qtype = TYPES[k % len(TYPES)]
            k += 1
        data, raw = encode_tensor(t, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)
        used.append(f"{name}:{qtype.name}")
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
        used.append(f"{name}:F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used


HARD = ["Hello world", "Café naïve résumé — déjà vu, Ångström", "Cafe\u0301 (decomposed)", "日本語のテキスト",
        "I ❤️ 🦀 and 🐍!", "a    b     c", "col1\tcol2\t\tcol3\t", "line one\r\nline two\r\n\r\nend",
        "trailing spaces   ", "   leading", "I'm sure they'LL say we don't", "1234567.89 and 3.14159",
        "hi<|endoftext|>there", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "", " ",
        "def f(x):\n    return x * 2\n"]


def make_gguf(arch, cls, cfg_cls, tok_kind, pre, seed, layers, tied, offset, embd_type, heads=4, kv_heads=2, **extra):
    tj = json.loads((mf.TOK_DIR / tok_kind / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    cfg = cfg_cls(vocab_size=n, hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    model = mf.build(cls, cfg, seed)
    with torch.no_grad():  # ordinary magnitudes: quantization error then stays that of real weights
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(0.1)
    d = OUT / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{arch}.gguf"
    used = write_gguf(path, arch, model, tok_kind, pre, offset, embd_type, np.random.default_rng(seed))
    ref_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32)
    ref_model = ref_model.to(torch.float64).eval()
    ref_model.set_attn_implementation(mf.ATTN)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, n, (1, 12), generator=g)
    with torch.no_grad():
        logits = ref_model(seq).logits[0].float().contiguous()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
    cases = []
    for text in HARD:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    save_file({"seq_ids": seq, "seq_logits": logits}, str(d / f"{arch}.reference.safetensors"), metadata={"format": "pt"})
    (d / f"{arch}.cases.json").write_text(json.dumps({"tensors": used, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"gguf {arch}: {path.stat().st_size / 1e3:.0f} kB, types {sorted(set(u.split(':')[1] for u in used))}")


def llama3_rope_freqs(cfg):
    """llama.cpp's `rope_freqs` tensor for a llama3 rope (convert_hf_to_gguf, LlamaModel): one
    divisor of each rope frequency: 1 for short wavelengths, `factor` for long ones, between them
    1 / ((1 - smooth) / factor + smooth)."""
    p = cfg.rope_parameters
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def make_llama3_gguf():
    """llama3.gguf: a Llama 3.1-style model whose rope scaling is only in `rope_freqs` (as llama.cpp
    writes Llama 3.1 / 3.2), every tensor F32; the reference is the HF model itself in float64 (the
    weights the file holds exactly; transformers' GGUF loader does not read rope_freqs). Head dim
    32 and original context 64 put frequencies in all three bands. llama3-bad-rope.gguf: the same
    with one interpolated divisor moved by 5%, which no llama3 schedule gives."""
    tj = json.loads((mf.TOK_DIR / "gpt2" / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = mf.LlamaConfig(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=dict(llama3))
    model = mf.build(mf.LlamaForCausalLM, cfg, 54)
    d = OUT / "gguf"
    freqs = llama3_rope_freqs(cfg)
    assert 1.0 < freqs.min() + 1e-6 and any(1.0 < f < 8.0 for f in freqs) and freqs.max() == 8.0, freqs
    rng = np.random.default_rng(54)
    write_gguf(d / "llama3.gguf", "llama", model, "gpt2", "smollm", 0, Q.F32, rng, f32_only=True,
               extra={"rope_freqs.weight": freqs})
    bad = freqs.copy()
    bad[int(np.argmax((freqs > 1.0) & (freqs < 8.0)))] *= 1.05
    write_gguf(d / "llama3-bad-rope.gguf", "llama", model, "gpt2", "smollm", 0, Q.F32, rng, f32_only=True,
               extra={"rope_freqs.weight": bad})
    m64 = model.to(torch.float64).eval()
    g = torch.Generator().manual_seed(54)
    long_ids = torch.randint(0, n, (1, 200), generator=g)
    with torch.no_grad():
        logits = m64(long_ids).logits[0, -16:].float().contiguous()
    save_file({"long_ids": long_ids, "long_logits": logits}, str(d / "llama3.reference.safetensors"),
              metadata={"format": "pt"})
    print(f"gguf llama3 rope: {(d / 'llama3.gguf').stat().st_size / 1e3:.0f} kB, divisors {freqs}")


def make_spm_gguf():
    """llama-spm.gguf: a llama model with a SentencePiece vocabulary (`tokenizer.ggml.model =
    "llama"`, as Llama 2 / Mistral files carry it): the test llama tokenizer's pieces with scores
    (the rank of the merge that makes each, negated; 0 for single characters and bytes) and no
    merges, so both sides rebuild them from the scores. The cases are transformers' GGUF
    tokenizer's ids and decoded text."""
    tj = json.loads((mf.TOK_DIR / "llama" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    n = len(vocab)
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    rank = {}
    for r, m in enumerate(tj["model"]["merges"]):
        a, b = m if isinstance(m, list) else m.split(" ")
        rank.setdefault(a + b, r)
    scores = [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]
    types = [6 if t.startswith("<0x") and t.endswith(">") and len(t) == 6 else 1 for t in tokens]
    types[0], types[1], types[2] = 2, 3, 3  # <unk>, <s>, </s>
    cfg = mf.LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = mf.build(mf.LlamaForCausalLM, cfg, 55)
    d = OUT / "gguf"
    path = d / "llama-spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128); w.add_embedding_length(32); w.add_block_count(1); w.add_feed_forward_length(64)
    w.add_head_count(2); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(types)
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    w.add_add_bos_token(True); w.add_add_eos_token(False)
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight":
            continue
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
        parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        if hf in names:
            name = names[hf]
        else:
            layer, rest = hf[len("model.layers."):].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{parts[base]}.{kind}"
        t = p.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            t = permute(t, 2)
        if name.endswith("attn_k.weight"):
            t = permute(t, 1)
        w.add_tensor(name, t)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
    cases = []
    for text in HARD + [" hello", "  two spaces first", "Hello\n\nworld", "<s>literal</s>"]:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    bos = tok.encode("Hello", add_special_tokens=True)
    (d / "llama-spm.cases.json").write_text(json.dumps({"cases": cases, "with_special": {"text": "Hello", "ids": bos}},
                                                       indent=1, ensure_ascii=False) + "\n")
    print(f"gguf llama-spm: {path.stat().st_size / 1e3:.0f} kB; {len(cases)} cases")


def make_bad_ggufs():
    d = OUT / "gguf"  # (a truncated file is cut from qwen2.gguf by the test itself)
    # An unknown GGML type id (99) in the first tensor info: patch the byte after its dims.
    w = gguf.GGUFWriter(str(d / "unknown-type.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    b = bytearray((d / "unknown-type.gguf").read_bytes())
    i = b.index(b"token_embd.weight") + len("token_embd.weight") + 4 + 16
    assert b[i:i + 4] == bytes([0, 0, 0, 0]), b[i:i + 4]
    b[i:i + 4] = (99).to_bytes(4, "little")
    (d / "unknown-type.gguf").write_bytes(bytes(b))
    w = gguf.GGUFWriter(str(d / "gpt2-arch.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def main():
    torch.use_deterministic_algorithms(True)
    # Only the fixtures added last (the others stay as committed).
    if sys.argv[1:] == ["llama3-gguf"]:
        make_llama3_gguf()
        return
    if sys.argv[1:] == ["spm-gguf"]:
        make_spm_gguf()
        return
    make_llama3_rope()
    # Matrices other than the vocabulary ones cycle through TYPES from `offset`: llama (2 layers,
    # 14 matrices) covers all 13 types, F32 / F16 / BF16 on k0 / v0 / o0 (the smallest).
    make_gguf("llama", mf.LlamaForCausalLM, mf.LlamaConfig, "gpt2", "smollm", 51, layers=2, tied=False,
              offset=len(TYPES) - 1, embd_type=Q.Q4_K)
    make_gguf("qwen2", mf.Qwen2ForCausalLM, mf.Qwen2Config, "qwen2", "qwen2", 52, layers=1, tied=True, offset=4,
              embd_type=Q.Q8_0)
    # transformers' GGUF loader does not read qwen3's key_length: head_dim must be Qwen3Config's 128.
    make_gguf("qwen3", mf.Qwen3ForCausalLM, mf.Qwen3Config, "qwen2", "qwen2", 53, layers=1, tied=False, offset=3,
              embd_type=Q.Q5_0, heads=2, kv_heads=1, head_dim=128)
    make_bad_ggufs()
    make_llama3_gguf()
    make_spm_gguf()


if __name__ == "__main__":
    main()
