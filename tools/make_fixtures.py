"""Tokenizer and model fixtures for pocl's parity tests (tests/tokenizers.rs, tests/models.rs,
tests/cli_models.rs). Everything is built offline from code: tiny tokenizers trained with the
`tokenizers` library on the small corpus below, tiny transformers models built from configs with
seeded random weights. Run by hand from the repository root:

    python tools/make_fixtures.py

Writes tests/fixtures/tokenizers/<kind>/{tokenizer.json,cases.json} and
tests/fixtures/models/<name>/{config.json, weights, tokenizer.json, reference.safetensors} plus
tests/fixtures/models/MANIFEST.json, then reloads every model directory with
AutoModelForCausalLM.from_pretrained and checks it reproduces the references.

Conventions the references follow (and pocl follows):
  * all references are computed in float64 (`attn_implementation="eager"`) from the weights as
    stored (f16/bf16 checkpoints are rounded first, then upcast), and written as float32;
  * padded batches: position_ids = (mask.cumsum(-1) - 1).clamp(min=0), passed explicitly, so the
    logits of real tokens do not depend on left padding. OPT derives its positions from the mask
    itself (cumsum(mask) * mask - 1, + offset 2), which gives the same positions on real tokens;
  * greedy references decode exactly 16 new tokens with EOS disabled (new tokens only);
    no_repeat_ngram_size=2 bans bigrams seen anywhere in prompt + generated tokens (HF rule);
  * attention is a registered float64 copy of "eager" (see eager_f64_attention below): stock eager
    softmaxes in float32 and yields NaN on fully-masked (left-padding) rows. RoPE cos/sin are still
    computed in float32 by transformers (~1e-7 relative), far below the tests' 1e-4 tolerance.
"""
import copy, json, math, os, shutil, sys, tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

import transformers
from transformers import (
    AutoModelForCausalLM, GenerationConfig,
    GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, LlamaConfig, LlamaForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, MistralConfig, MistralForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
TOK_DIR = ROOT / "tests/fixtures/tokenizers"
MODEL_DIR = ROOT / "tests/fixtures/models"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


# Stock "eager" attention in transformers 5 is not a float64 reference: most families (llama,
# qwen, mistral, opt) run softmax(..., dtype=float32), and the float64 mask minimum turns into -inf
# there, so fully-masked query rows (left padding) become NaN, which then leaks into real tokens
# of the next layer through 0 * NaN. The references therefore use this registered attention: the
# same math entirely in float64, masked scores replaced (not added) by -1e300.
def eager_f64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        scores = scores.masked_fill(~allowed[..., : key.shape[-2]], -1e300)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN = "eager_f64"
AttentionInterface.register(ATTN, eager_f64_attention)
AttentionMaskInterface.register(ATTN, eager_mask)

# --------------------------------------------------------------------------------------------
# Training corpus: a few KB of English, code and some unicode. Test strings deliberately contain
# characters that are NOT here (most CJK, most emoji, Korean, Arabic, ...) so that the llama
# tokenizer has to fall back to byte tokens.
# --------------------------------------------------------------------------------------------
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away.",
    "Knowledge distillation trains a small student model to match the output distribution of a larger teacher model.",
    "The student learns from the soft targets of the teacher: the logits divided by a temperature, then a softmax.",
    "We compute the Kullback-Leibler divergence between the teacher and the student for every token in the batch.",
    "Hello world! Hello there. How are you today? I'm fine, thanks. They'll be here soon, don't worry.",
    "It's a truth universally acknowledged that a single model in possession of good data must be in want of a GPU.",
    "She said: \"we're going to the market\", and he replied, 'you've got to be kidding me'. I'd rather stay home.",
    "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 65536 3.14159 2.71828 1e-5 0.001 99.9%",
    "Dates and times: 2024-01-15 12:30:45, 1999-12-31 23:59:59, version 1.2.3, port 8080.",
    "Café, naïve, résumé, déjà vu, façade, jalapeño, über, Ångström, crème brûlée, São Paulo.",
    "Ça va? Où est la bibliothèque? Es ist schön. ¿Qué tal? Grüße aus München!",
    "東京 is the capital of Japan; 北京 is the capital of China. 日本 and 中国.",
    "Emoji: 🙂 👍 ❤ ✨ 🔥 — arrows → ← ↑ ↓ and math ≤ ≥ ≠ ± × ÷ ∞ π.",
    "def forward(self, input_ids, attention_mask=None):\n    hidden = self.embed(input_ids)\n    for layer in self.layers:\n        hidden = layer(hidden, attention_mask)\n    return self.norm(hidden)\n",
    "import torch\nimport numpy as np\n\nclass Model(torch.nn.Module):\n    def __init__(self, config):\n        super().__init__()\n        self.config = config\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f\"even {i}\")\n    else:\n        print(\"odd\", i)\n",
    "fn main() {\n    let x: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", x);\n}\n",
    "{\"name\": \"pocl\", \"version\": \"0.1.0\", \"layers\": [1, 2, 3], \"enabled\": true, \"ratio\": 0.5}",
    "<html><body><div class=\"main\">Hello</div></body></html>",
    "SELECT id, name FROM users WHERE age > 21 ORDER BY name;",
    "x = [1, 2, 3]; y = {'a': 1, 'b': 2}; z = (x, y)  # a comment",
    "\tTabs\tand  double  spaces   and    more\n\nNew paragraphs.\r\nWindows line endings.\r\n",
    "the the the of of and and to to in in is is it it that that for for on on with with as as",
    "model training loss gradient optimizer learning rate schedule warmup decay batch size sequence length",
    "tokenizer vocabulary merges bytes unicode normalization whitespace punctuation special tokens",
]
CORPUS = CORPUS * 3  # counts matter for BPE; repetition keeps it a few KB of distinct text

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — déjà vu, Ångström",
    "Cafe\u0301 vs Caf\u00e9 (decomposed vs composed)",
    "日本語のテキストと中文字符",
    "한국어 텍스트, مرحبا بالعالم, שלום",
    "I ❤️ 🦀 and 🐍!",
    "family: 👨\u200d👩\u200d👧\u200d👦, flag: 🏳️\u200d🌈, thumbs: 👍🏽",
    "a    b     c      d",
    "col1\tcol2\t\tcol3\t",
    "line one\r\nline two\r\n\r\nend",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\nmany\n\n\n\nnewlines\n",
    "I'm sure they'LL say we don't, you've, she'd, it's, we're",
    "I'M SHOUTING, DON'T YOU'VE",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None  \n",
    "{\"key\": [1, 2.5, null], \"nested\": {\"ok\": true}}\n",
    "1234567.89 and 3.14159, 2026-11-24, 0x1F",
    "hi<|endoftext|>there",
    "",
    " ",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "hello</s>world <s> again",
    "naïve café 東京 🚀 x²+y²=z² ∑∫√",
    "“Smart quotes” — and ‘single’ … ellipsis",
    "ÀÉÎÕÜ àéîõü ßøæœ",
    "a\u00a0b\u3000c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<0x41> is not a byte token here",
]


def byte_level_bpe(pre_tokenizer, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tr = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer=tr)
    return tok


def make_gpt2_tokenizer():
    # GPT-2's tokenizer.json: no normalizer, ByteLevel pre-tokenizer with the GPT-2 regex,
    # ByteLevel post-processor and decoder, <|endoftext|> as the last id.
    tok = byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True), 600)
    tok.normalizer = None
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])

    def like_gpt2(j):  # GPT-2's file spells the empty affixes as "" rather than null
        j["model"]["continuing_subword_prefix"] = ""
        j["model"]["end_of_word_suffix"] = ""
        return j
    return patch_json(tok, like_gpt2)


def make_qwen2_tokenizer():
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tr = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer=tr)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])

    def like_qwen2(j):  # the Python ByteLevel decoder constructor ignores its flags; Qwen2 has all false
        j["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return j
    return patch_json(tok, like_qwen2)


def patch_json(tok, fn):
    return Tokenizer.from_str(json.dumps(fn(json.loads(tok.to_str()))))


def make_llama_tokenizers():
    """SentencePiece-style BPE with byte fallback. Trained with a splitting Metaspace, then the
    vocab/merges are handed to transformers 5's LlamaTokenizer (the class LlamaTokenizerFast now
    aliases), whose tokenizer.json is what we commit: normalizer null, pre_tokenizer
    Metaspace(replacement="▁", prepend_scheme="first", split=false), decoder
    Sequence[Replace("▁"," "), ByteFallback, Fuse, Strip(" ",1,0)]. Also returned: the legacy
    Llama-2 hub form (normalizer Sequence[Prepend("▁"), Replace(" ","▁")], pre_tokenizer null)
    with the same vocab, written as tokenizers/llama-legacy."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # 795, not a multiple of 8: the models round their vocab up to 800, so padding rows exist.
    tr = trainers.BpeTrainer(vocab_size=795, min_frequency=2, show_progress=False,
                             special_tokens=specials + byte_toks)
    tok.train_from_iterator(CORPUS, trainer=tr)
    m = json.loads(tok.to_str())["model"]
    vocab = m["vocab"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    assert [vocab[t] for t in specials + byte_toks] == list(range(259))

    from transformers import LlamaTokenizer
    # add_bos_token=True as in the Llama hub files: the post-processor then prepends <s> (id 1)
    # when special tokens are requested (the cases use add_special_tokens=False).
    hf = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        modern = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

    legacy = Tokenizer.from_str(modern.to_str())
    legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    legacy.pre_tokenizer = None
    return modern, legacy


def write_tokenizer(kind, tok, check=None):
    d = TOK_DIR / kind
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"), pretty=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))  # cases from the file as written
    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    (d / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if check:
        check(tok, cases)
    print(f"tokenizer {kind}: vocab {tok.get_vocab_size(with_added_tokens=True)}, {len(cases)} cases")
    return tok


def check_llama(tok, cases):
    n_fallback = sum(1 for c in cases for i in c["ids"] if 3 <= i < 259)
    assert n_fallback > 20, f"byte fallback barely exercised ({n_fallback})"
    assert not any(0 in c["ids"] for c in cases), "<unk> should never appear with byte fallback"


def check_special_split(tok, cases):
    eot = tok.token_to_id("<|endoftext|>")
    assert eot in next(c for c in cases if c["text"] == "hi<|endoftext|>there")["ids"]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def scramble(model, seed, std=0.2):
    """Seeded, deliberately large random weights: N(0, std) everywhere (biases included),
    norm weights 1 + N(0, std), so that mistakes anywhere show up in the logits."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for mod in model.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                r = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
                p.copy_((1.0 + r) if (is_norm and name == "weight") else r)


def round_up(n, k=8):
    return (n + k - 1) // k * k


def greedy_manual(model, prompt, n_new, ngram):
    """Cache-free greedy decoding (independent check of model.generate) and the smallest top-1 vs
    top-2 logit margin seen, so that an f32 implementation cannot flip a near tie."""
    ids = prompt.clone()
    margin = math.inf
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(ids).logits[0, -1].clone()
        if ngram:
            seq = ids[0].tolist()
            prefix = tuple(seq[len(seq) - (ngram - 1):]) if ngram > 1 else ()
            for i in range(len(seq) - ngram + 1):
                if tuple(seq[i:i + ngram - 1]) == prefix:
                    logits[seq[i + ngram - 1]] = -math.inf
        top = torch.topk(logits, 2).values
        margin = min(margin, (top[0] - top[1]).item())
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[:, prompt.shape[1]:], margin


def hf_greedy(model, prompt, n_new, ngram):
    gc = GenerationConfig(max_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=None,
                          bos_token_id=None, pad_token_id=0, no_repeat_ngram_size=ngram)
    model.generation_config = gc
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)
    new = out[:, prompt.shape[1]:]
    assert new.shape == (1, n_new), new.shape
    return new


def batch_inputs(vocab, g):
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.int64)
    mask[1, :3] = 0   # left-padded by 3
    mask[2, -4:] = 0  # right-padded by 4
    ids = ids * mask  # pad id 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def forward_batch(model, ids, mask, pos, is_opt):
    with torch.no_grad():
        if is_opt:  # OPT takes its positions from the mask (same positions on real tokens)
            return model(input_ids=ids, attention_mask=mask).logits
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def make_reference(model, tok_vocab, seed, is_opt=False):
    """model: float64, eval, eager attention."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.randint(3, tok_vocab, (1, 12), generator=g)
    with torch.no_grad():
        seq_logits = model(seq_ids).logits[0]
    ids, mask, pos = batch_inputs(tok_vocab, g)
    batch_logits = forward_batch(model, ids, mask, pos, is_opt)
    # The unpadded row of the batch must agree with a lone forward pass; left/right padded rows too.
    for b in range(3):
        keep = mask[b].bool()
        with torch.no_grad():
            alone = model(ids[b][keep][None]).logits[0]
        err = (alone - batch_logits[b][keep]).abs().max().item()
        assert err < 1e-9 * max(1.0, alone.abs().max().item()), f"padding changes logits of row {b}: {err}"
    # Greedy prompt: the first seeded candidate whose decodings never come within 0.05 of a tie
    # (an f32 implementation must not flip a near tie) and where the plain greedy output repeats a
    # bigram, so that greedy_ngram_ids differs from greedy_ids and no_repeat_ngram is exercised.
    best = None
    for attempt in range(500):
        prompt = torch.randint(3, tok_vocab, (1, 6), generator=g)
        greedy, m0 = greedy_manual(model, prompt, 16, 0)
        ngram, m2 = greedy_manual(model, prompt, 16, 2)
        differs = not torch.equal(greedy, ngram)
        cand = (prompt, greedy, ngram, min(m0, m2), differs)
        if min(m0, m2) > 0.05 and differs:
            best = cand
            break
        if best is None or (cand[4], cand[3]) > (best[4], best[3]):
            best = cand
    prompt, greedy, ngram, margin, _ = best
    assert margin > 0.02 and not torch.equal(greedy, ngram), f"no good greedy prompt found (margin {margin})"
    assert torch.equal(hf_greedy(model, prompt, 16, 0), greedy), "model.generate disagrees with manual greedy"
    assert torch.equal(hf_greedy(model, prompt, 16, 2), ngram), "model.generate (ngram) disagrees with manual"
    assert torch.isfinite(seq_logits).all() and torch.isfinite(batch_logits).all()
    ref = {
        "seq_ids": seq_ids.to(torch.int64).contiguous(),
        "seq_logits": seq_logits.float().contiguous(),
        "batch_ids": ids.to(torch.int64).contiguous(),
        "batch_mask": mask.to(torch.int64).contiguous(),
        "batch_logits": batch_logits.float().contiguous(),
        "greedy_prompt": prompt.to(torch.int64).contiguous(),
        "greedy_ids": greedy.to(torch.int64).contiguous(),
        "greedy_ngram_ids": ngram.to(torch.int64).contiguous(),
    }
    return ref, margin


def rounded_f64(model, dtype):
    """A float64 copy whose parameters are exactly those stored in `dtype`. Only parameters are
    rounded: buffers such as RoPE's inv_freq are not stored and are recomputed in f32 on load
    (rounding them to bf16 too would shift the reference by ~1e-3)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).float())
    return m.to(torch.float64).eval()


def save_hf(model, d, dtype, **kw):
    m = copy.deepcopy(model).to(dtype)
    m.config.dtype = dtype
    m.save_pretrained(d, safe_serialization=True, **kw)


def build(cls, cfg, seed):
    torch.manual_seed(seed)
    model = cls(cfg).float()
    model.set_attn_implementation(ATTN)
    scramble(model, seed)
    return model.eval()


MANIFEST = {}


def finish(name, d, model64, tok_kind, tok_vocab, notes, is_opt=False, seed=0, reference=True):
    if not (d / "tokenizer.json").exists():
        shutil.copy(TOK_DIR / tok_kind / "tokenizer.json", d / "tokenizer.json")
    entry = {"model_type": model64.config.model_type, "architecture": type(model64).__name__,
             "vocab_size": model64.config.vocab_size, "tokenizer": tok_kind, "tokenizer_vocab_size": tok_vocab,
             "files": sorted(p.name for p in d.iterdir() if p.is_file()) + (["reference.safetensors"] if reference else []),
             "notes": notes}
    if reference:
        ref, margin = make_reference(model64, tok_vocab, seed + 1000, is_opt)
        save_file(ref, str(d / "reference.safetensors"), metadata={"format": "pt"})
        entry["greedy_min_margin"] = round(margin, 4)
    entry["files"] = sorted(set(entry["files"]))
    MANIFEST[name] = entry
    print(f"model {name}: {entry['architecture']} vocab {entry['vocab_size']} files {entry['files']}")


def fresh_dir(name):
    d = MODEL_DIR / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def gpt2_config(vocab, eot):
    return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_ctx=64,
                      bos_token_id=eot, eos_token_id=eot, activation_function="gelu_new")


def make_gpt2(tok):
    V = tok.get_vocab_size(with_added_tokens=True)
    eot = tok.token_to_id("<|endoftext|>")
    model = build(GPT2LMHeadModel, gpt2_config(V, eot), seed=11)
    d = fresh_dir("gpt2")
    save_hf(model, d, torch.float32)
    finish("gpt2", d, rounded_f64(model, torch.float32), "gpt2", V,
           "GPT2LMHeadModel, transformers-5 save_pretrained (keys transformer.*, tied lm_head not stored), f32, "
           "vocab = exact tokenizer size (no padding rows)", seed=11)


def make_gpt2_hub(tok):
    """Hand-written like the old hub gpt2 checkpoints: no `transformer.` prefix, attn.bias /
    attn.masked_bias buffers present, no lm_head, float16, transformers-4 config."""
    V = tok.get_vocab_size(with_added_tokens=True)
    eot = tok.token_to_id("<|endoftext|>")
    cfg = gpt2_config(V, eot)
    model = build(GPT2LMHeadModel, cfg, seed=12)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        assert k.startswith("transformer."), k
        sd[k[len("transformer."):]] = v.detach().to(torch.float16).contiguous().clone()
    n = cfg.n_positions
    for i in range(cfg.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.float16)).view(1, 1, n, n).contiguous()
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.float16)
    d = fresh_dir("gpt2-hub")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    v4 = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": eot, "embd_pdrop": 0.1, "eos_token_id": eot, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": n, "n_embd": cfg.n_embd,
        "n_head": cfg.n_head, "n_inner": None, "n_layer": cfg.n_layer, "n_positions": n,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "torch_dtype": "float16", "transformers_version": "4.38.2", "use_cache": True, "vocab_size": V,
    }
    (d / "config.json").write_text(json.dumps(v4, indent=2) + "\n")
    write_legacy_merges_tokenizer(TOK_DIR / "gpt2" / "tokenizer.json", d / "tokenizer.json")
    finish("gpt2-hub", d, rounded_f64(model, torch.float16), "gpt2", V,
           "old hub layout: keys without 'transformer.' prefix, h.N.attn.bias [1,1,64,64] tril and "
           "h.N.attn.masked_bias scalar -1e4 buffers (to be ignored), no lm_head (tied to wte), float16, "
           "transformers-4 config.json (torch_dtype, n_ctx); tokenizer.json = the gpt2 one with merges spelled as "
           "'a b' strings (pre-0.20 tokenizers format, same tokenization)", seed=12)


def write_legacy_merges_tokenizer(src, dst):
    """The gpt2 tokenizer with merges spelled as "a b" strings, as in tokenizer.json files written by
    tokenizers < 0.20 (the old hub gpt2 file). Same tokenization, checked on every case."""
    j = json.loads(Path(src).read_text(encoding="utf-8"))
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    Path(dst).write_text(json.dumps(j, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    a, b = Tokenizer.from_file(str(src)), Tokenizer.from_file(str(dst))
    for text in CASES:
        assert a.encode(text, add_special_tokens=False).ids == b.encode(text, add_special_tokens=False).ids, text


def make_opt(tok, name, proj, pre_ln, seed):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    eot = tok.token_to_id("<|endoftext|>")
    cfg = OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=proj, do_layer_norm_before=pre_ln,
                    activation_function="relu", enable_bias=True, tie_word_embeddings=True,
                    pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, dropout=0.0, attention_dropout=0.0)
    model = build(OPTForCausalLM, cfg, seed=seed)
    d = fresh_dir(name)
    save_hf(model, d, torch.float32)
    note = ("pre-LN (do_layer_norm_before true), word_embed_proj_dim = hidden (no project_in/out)" if pre_ln else
            "post-LN (do_layer_norm_before false, no final_layer_norm), word_embed_proj_dim 32 < hidden 64 "
            "(project_in/project_out present, lm_head is [vocab, 32] tied to embed_tokens)")
    finish(name, d, rounded_f64(model, torch.float32), "gpt2", tok.get_vocab_size(with_added_tokens=True),
           f"OPTForCausalLM, relu, tied head, learned positions with offset 2 (embed_positions has 66 rows); "
           f"{note}; f32; tokenizer gpt2; batch reference positions come from the mask (OPT's own rule)",
           is_opt=True, seed=seed)


def llama_config(V, **kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, hidden_act="silu",
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return LlamaConfig(**base)


def make_llama(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    model = build(LlamaForCausalLM, llama_config(V), seed=21)
    d = fresh_dir("llama")
    save_hf(model, d, torch.bfloat16, max_shard_size="120KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert 2 <= len(shards) <= 3 and (d / "model.safetensors.index.json").exists(), shards
    finish("llama", d, rounded_f64(model, torch.bfloat16), "llama", tok.get_vocab_size(with_added_tokens=True),
           f"LlamaForCausalLM, GQA 4/2 heads, head_dim 16, untied, bfloat16, sharded into {len(shards)} files + "
           "model.safetensors.index.json, transformers-5 config (rope_parameters, dtype)", seed=21)


def make_llama_v4(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    model = build(LlamaForCausalLM, llama_config(V, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
                  seed=22)
    d = fresh_dir("llama-v4")
    save_hf(model, d, torch.float32)
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg.pop("dtype", None)
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg["transformers_version"] = "4.45.2"
    cfg["pretraining_tp"] = 1
    cfg["attention_bias"] = False
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    finish("llama-v4", d, rounded_f64(model, torch.float32), "llama", tok.get_vocab_size(with_added_tokens=True),
           "LlamaForCausalLM with a transformers-4 style config.json (top-level rope_theta 500000, rope_scaling "
           "null, torch_dtype, no rope_parameters), f32 single file, untied", seed=22)


def make_llama_yarn(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    # Smaller than the others (hidden 32, 1 layer, bf16): only the refusal is tested.
    model = build(LlamaForCausalLM, llama_config(V, rope_parameters=dict(yarn), hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=1), seed=23)
    d = fresh_dir("llama-yarn")
    save_hf(model, d, torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    # Both spellings, so a parser of either transformers-4 (rope_scaling.type) or transformers-5
    # (rope_parameters.rope_type) configs sees the yarn scaling.
    cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    finish("llama-yarn", d, model.double(), "llama", tok.get_vocab_size(with_added_tokens=True),
           "rope scaling 'yarn' (rope_parameters.rope_type and rope_scaling.type): pocl must REFUSE it with an "
           "error naming yarn and config.json; no reference", reference=False)


def make_qwen2(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    eot = tok.token_to_id("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                      bos_token_id=eot, eos_token_id=eot)
    model = build(Qwen2ForCausalLM, cfg, seed=31)
    d = fresh_dir("qwen2")
    save_hf(model, d, torch.float16)
    finish("qwen2", d, rounded_f64(model, torch.float16), "qwen2", tok.get_vocab_size(with_added_tokens=True),
           "Qwen2ForCausalLM: q/k/v biases (o_proj none), tied head (lm_head not stored), GQA 4/2, rope_theta 1e6, "
           "float16", seed=31)


def make_qwen3(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    eot = tok.token_to_id("<|endoftext|>")
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attention_bias=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                      bos_token_id=eot, eos_token_id=eot)
    model = build(Qwen3ForCausalLM, cfg, seed=32)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (96, 64)
    d = fresh_dir("qwen3")
    save_hf(model, d, torch.float32)
    finish("qwen3", d, rounded_f64(model, torch.float32), "qwen2", tok.get_vocab_size(with_added_tokens=True),
           "Qwen3ForCausalLM: per-head RMSNorm q_norm/k_norm (weight [24]), explicit head_dim 24 != hidden/heads 16 "
           "(q_proj [96,64], k/v_proj [48,64], o_proj [64,96]), no biases, untied, GQA 4/2, f32", seed=32)


def make_mistral(tok):
    V = round_up(tok.get_vocab_size(with_added_tokens=True))
    cfg = MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=None,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = build(MistralForCausalLM, cfg, seed=41)
    d = fresh_dir("mistral")
    save_hf(model, d, torch.float32)
    finish("mistral", d, rounded_f64(model, torch.float32), "llama", tok.get_vocab_size(with_added_tokens=True),
           "MistralForCausalLM, sliding_window null, GQA 4/2, untied, f32", seed=41)


# --------------------------------------------------------------------------------------------
def verify():
    """Reload every directory independently and compare with the stored references."""
    print(f"\nverification (AutoModelForCausalLM.from_pretrained(dir), float64, {ATTN}):")
    ok = True
    for name, entry in MANIFEST.items():
        d = MODEL_DIR / name
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation=ATTN).eval()
        if "reference.safetensors" not in entry["files"]:
            print(f"  {name:10s} loaded (rope {getattr(model.config, 'rope_parameters', None)}), no reference")
            continue
        r = load_file(str(d / "reference.safetensors"))
        with torch.no_grad():
            seq = model(r["seq_ids"]).logits[0]
        scale = r["seq_logits"].abs().max().item()
        e1 = (seq - r["seq_logits"].double()).abs().max().item() / scale
        mask = r["batch_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        bl = forward_batch(model, r["batch_ids"], mask, pos, entry["model_type"] == "opt")
        keep = mask.bool()
        e2 = (bl[keep] - r["batch_logits"].double()[keep]).abs().max().item() / r["batch_logits"][keep].abs().max().item()
        g0 = hf_greedy(model, r["greedy_prompt"], 16, 0)
        g2 = hf_greedy(model, r["greedy_prompt"], 16, 2)
        # Cross-check with stock eager attention (float32 softmax) where it is NaN-free: unpadded input.
        stock = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
        with torch.no_grad():
            e0 = (stock(r["seq_ids"]).logits[0] - r["seq_logits"].double()).abs().max().item() / scale
        good = e0 < 1e-5 and e1 < 1e-5 and e2 < 1e-5 and torch.equal(g0, r["greedy_ids"]) and torch.equal(g2, r["greedy_ngram_ids"])
        ok &= good
        print(f"  {name:10s} seq rel err {e1:.2e} (stock eager {e0:.2e})  batch rel err {e2:.2e}  greedy {torch.equal(g0, r['greedy_ids'])}"
              f"  ngram {torch.equal(g2, r['greedy_ngram_ids'])}  {'OK' if good else 'FAIL'}")
    return ok


def dir_size(p):
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    toks = {}
    toks["gpt2"] = write_tokenizer("gpt2", make_gpt2_tokenizer(), check_special_split)
    toks["qwen2"] = write_tokenizer("qwen2", make_qwen2_tokenizer(), check_special_split)
    modern, legacy = make_llama_tokenizers()
    toks["llama"] = write_tokenizer("llama", modern, check_llama)
    write_tokenizer("llama-legacy", legacy, check_llama)

    make_gpt2(toks["gpt2"])
    make_gpt2_hub(toks["gpt2"])
    make_opt(toks["gpt2"], "opt", proj=64, pre_ln=True, seed=13)
    make_opt(toks["gpt2"], "opt-350m", proj=32, pre_ln=False, seed=14)
    make_llama(toks["llama"])
    make_llama_v4(toks["llama"])
    make_qwen2(toks["qwen2"])
    make_qwen3(toks["qwen2"])
    make_mistral(toks["llama"])
    make_llama_yarn(toks["llama"])

    (MODEL_DIR / "MANIFEST.json").write_text(json.dumps(MANIFEST, indent=1, sort_keys=True) + "\n")
    ok = verify()
    total = dir_size(TOK_DIR) + dir_size(MODEL_DIR)
    print(f"\ntotal fixture size: {total / 1e6:.2f} MB (tokenizers {dir_size(TOK_DIR) / 1e6:.2f} MB, "
          f"models {dir_size(MODEL_DIR) / 1e6:.2f} MB)")
    if not ok:
        sys.exit("verification FAILED")


if __name__ == "__main__":
    main()
