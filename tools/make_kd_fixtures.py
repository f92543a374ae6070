#!/usr/bin/env python3
"""Regenerates tests/fixtures/kd/reference.safetensors: float64 PyTorch-autograd references for the
KD divergences and the cross-entropy of src/kd (POCL.md §4).

The input logits are NOT stored: both this script and tests/kd_common/mod.rs generate them from the
same integer LCG whose values k/64 - 8 are exact in f32, then apply the same row edits (extreme
logits, exact zero probabilities). Only reference values and gradients are stored.

Usage: python tools/make_kd_fixtures.py   (needs torch, safetensors, numpy; not run by CI)
"""
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "kd", "reference.safetensors")
MASK = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
ROWS = len(MASK)
NEG_BIG = float(np.float32(-1e30))  # -1e30 as f32 sees it
LOG_PROB_FLOOR = -1e30
DIVS = {"fkl": None, "rkl": None, "jsd": 0.1, "tvd": None, "skl": 0.1, "srkl": 0.1}
# (vocab, temperatures); the small vocabs also cover the ends of the T range.
CASES = [(50, [0.5, 1.0, 2.0, 10.0]), (1000, [0.5, 1.0, 2.0, 10.0]), (50257, [1.0, 2.0])]
SAMPLES_PER_ROW = 400  # gradient entries stored per row for vocabs above FULL_GRAD_MAX
FULL_GRAD_MAX = 1000


class Lcg:
    """64-bit LCG (Knuth's MMIX constants); next() returns the top 24 bits."""

    def __init__(self, seed):
        self.s = seed & (2**64 - 1)

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        return self.s >> 40


def lcg_logits(seed, n):
    g = Lcg(seed)
    return np.array([(g.next() % 1024) / 64.0 - 8.0 for _ in range(n)], dtype=np.float32)


def inputs(v):
    """Teacher, student logits [ROWS, v] (f32) and labels [ROWS]; mirrors tests/kd_common."""
    t = lcg_logits(2 * v + 1, ROWS * v).reshape(ROWS, v)
    s = lcg_logits(2 * v + 2, ROWS * v).reshape(ROWS, v)
    g = Lcg(2 * v + 3)
    labels = np.array([g.next() % v for _ in range(ROWS)], dtype=np.int64)
    # row 1: masked out. row 2: large |logits| with big offsets (exact in f32: integers < 2^24).
    t[2] = t[2] * 256 + 20000
    s[2] = s[2] * 256 - 20000
    # row 3: teacher exact zeros via -inf; row 4: via -1e30; row 5: student == teacher.
    t[3, 0::5] = -np.inf
    t[4, 1::3] = NEG_BIG
    s[5] = t[5]
    return t, s, labels


def divergence_rows(name, param, t, s, T):
    """Per-row D_T in float64, log domain, 0*log 0 = 0 via torch.where (no NaN gradients)."""
    lp = torch.log_softmax(t / T, dim=-1).clamp(min=LOG_PROB_FLOOR)
    lq = torch.log_softmax(s / T, dim=-1)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(lq)

    def xterm(w, a, b):  # sum of w * (a - b) where w > 0
        return torch.where(w > 0, w * (a - b), zero).sum(-1)

    def log_mix(wp, wq):  # log(wp p + wq q), stable
        return torch.logaddexp(math.log(wp) + lp, math.log(wq) + lq)

    if name == "fkl":
        return xterm(p, lp, lq)
    if name == "rkl":
        return xterm(q, lq, lp)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        b = param
        lm = log_mix(b, 1 - b)
        return b * xterm(p, lp, lm) + (1 - b) * xterm(q, lq, lm)
    if name == "skl":
        return xterm(p, lp, log_mix(param, 1 - param))
    if name == "srkl":
        return xterm(q, lq, log_mix(1 - param, param))
    raise ValueError(name)


def store_grad(out, key, grad, v):
    """Full gradient for small vocabs; else sampled entries plus per-row sum of squares / max."""
    if v <= FULL_GRAD_MAX:
        out[key + "_grad"] = grad
        return
    g = Lcg(7 * v + len(key))
    idx = []
    for r in range(ROWS):
        row = grad[r].abs()
        top = torch.topk(row, 8).indices.tolist()  # the largest entries are the sensitive ones
        idx += [r * v + j for j in top] + [r * v + g.next() % v for _ in range(SAMPLES_PER_ROW)]
    idx = torch.tensor(idx, dtype=torch.int64)
    out[key + "_grad_idx"] = idx
    out[key + "_grad_val"] = grad.reshape(-1)[idx]
    out[key + "_grad_rowsumsq"] = (grad * grad).sum(-1)
    out[key + "_grad_rowmaxabs"] = grad.abs().amax(-1)


def main():
    torch.set_default_dtype(torch.float64)
    mask = torch.tensor(MASK)
    out = {}
    for v, temps in CASES:
        t32, s32, labels = inputs(v)
        t = torch.from_numpy(t32).double()
        for T in temps:
            for name, param in DIVS.items():
                s = torch.from_numpy(s32).double().requires_grad_(True)
                rows = divergence_rows(name, param, t, s, T)
                loss = T * T * (rows * mask).sum()
                loss.backward()
                assert torch.isfinite(s.grad).all(), (v, T, name)
                key = f"V{v}_T{T:g}_{name}"
                out[key + "_rows"] = rows.detach()
                out[key + "_loss"] = loss.detach().reshape(1)
                store_grad(out, key, s.grad.detach(), v)
        s = torch.from_numpy(s32).double().requires_grad_(True)
        ce_rows = -torch.log_softmax(s, -1).gather(1, torch.from_numpy(labels)[:, None])[:, 0]
        (ce_rows * mask).sum().backward()
        key = f"V{v}_ce"
        out[key + "_rows"] = ce_rows.detach()
        out[key + "_labels"] = torch.from_numpy(labels)
        store_grad(out, key, s.grad.detach(), v)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({k: x.contiguous() for k, x in out.items()}, OUT)
    print(f"wrote {OUT}: {len(out)} tensors, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
