"""Reference for pocl's bf16-mixed student (tests/mixed_precision.rs): a forward + backward of the
tiny GPT-2 and Llama fixtures of tools/make_fixtures.py (tests/fixtures/models/{gpt2,llama})
under torch.autocast("cpu", dtype=torch.bfloat16), f32 master weights. Run by hand from the
repository root (torch + transformers, no network):

    python tools/make_mixed_fixtures.py

Writes tests/fixtures/mixed/{gpt2,llama}.safetensors: the input ids and labels, the f32 logits,
the loss (mean cross-entropy of the logits against the labels, f32) and the gradient of every
parameter under the name pocl saves it with.

What autocast covers here is pocl's choice (NOTES.md, "CUDA"): the linear layers (GPT-2's Conv1D
addmm, Llama's nn.Linear) run in bf16 as autocast runs them; the attention (scores, softmax,
probabilities times values) runs with autocast off (a registered attention function: make_fixtures'
float64 one, its output read as f32), and
the lm head is an f32 product of the f32 hidden states outside autocast, and the MLP's
activation runs on its input widened to f32. Norms and RoPE need nothing: the residual stream
is f32, so they already run in f32.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import eager_f64_attention  # noqa: E402  (the tools' one eager attention)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/mixed"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


CALLS = {"attention": 0}


def f32_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """make_fixtures' float64 eager attention with autocast off (q, k, v arrive in bf16 from the
    projections), its output read as f32: what pocl's f32 attention computes, to f32 rounding."""
    CALLS["attention"] += 1
    with torch.autocast("cpu", enabled=False):
        q, k, v = query.double(), key.double(), value.double()
        out, probs = eager_f64_attention(module, q, k, v, attention_mask, scaling, dropout, **kwargs)
        return out.float(), probs.float()


class F32Activation(torch.nn.Module):
    """The MLP's activation in f32: autocast leaves elementwise ops alone, so on the bf16 output
    of a projection GELU-tanh would run as ~8 bf16 ops, each rounded; pocl's activations are f32."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x.float())


ATTN = "f32_no_autocast"
AttentionInterface.register(ATTN, f32_attention)
AttentionMaskInterface.register(ATTN, eager_mask)


def reference(name, body, saved_prefix):
    model = AutoModelForCausalLM.from_pretrained(
        ROOT / "tests/fixtures/models" / name, dtype=torch.float32, attn_implementation=ATTN
    )
    for mlp in (m for n, m in model.named_modules() if n.endswith(".mlp")):
        for attr in ("act", "act_fn"):
            if hasattr(mlp, attr):
                setattr(mlp, attr, F32Activation(getattr(mlp, attr)))
    model.train()
    for m in model.modules():  # dropout off, everything else as in training
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 11), generator=g)
    labels = torch.randint(0, vocab, (2, 11), generator=g)
    calls = CALLS["attention"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = getattr(model, body)(input_ids=ids).last_hidden_state
    assert CALLS["attention"] - calls == model.config.num_hidden_layers, "f32 attention unused"
    assert hidden.dtype == torch.float32, hidden.dtype
    logits = F.linear(hidden, model.get_output_embeddings().weight)  # f32, autocast off
    loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
    loss.backward()
    out = {
        "ids": ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": logits.detach().contiguous(),
        "loss": loss.detach().reshape(1),
    }
    for n, p in model.named_parameters():
        if p.grad is not None:
            out["grad." + saved_prefix(n)] = p.grad.detach().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT / f"{name}.safetensors")
    print(name, "loss", loss.item(), "grads", sum(k.startswith("grad.") for k in out))


reference("gpt2", "transformer", lambda n: n)
reference("llama", "model", lambda n: n)
