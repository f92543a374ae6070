#!/usr/bin/env python3
"""Experiment (issue 15, not used by pocl): would a SAMPLED rest make the teacher cache faithful?

The cache stores the teacher's top K logits and treats the rest as one bucket; at POCL's hot
temperatures a 49k-word teacher puts much of its mass in that rest, and the bucket loss is far
from the full one (README, "Teacher cache"). The alternative measured here spends the same
bytes on K - M top tokens plus M tokens SAMPLED from the teacher's rest at the hottest
temperature T0 (ids + logits, as the cache stores the top K), and estimates the rest's share of
the forward KL by importance weighting:
    sum_{j in rest} p_T(j) log(p_T(j) / q_T(j))  ~  1/M sum_m w_m log(p_T(j_m) / q_T(j_m)),
    w_m = p_T(j_m) / pi(j_m),  pi = the teacher's rest distribution at T0,
which is unbiased at every temperature (p_T and pi are exact from the stored logits and the
full row's log-sum-exp at each T, which the cache already keeps). Reverse KL is not estimable
this way (it weights the rest by the student's mass, where the teacher's samples rarely fall).

Usage (torch + transformers from PyPI; the models of README "Distilling a real model"):
    python3 tools/cache_rest_experiment.py TEACHER_DIR STUDENT_DIR DATA.jsonl [--samples 32]
Prints one JSON line per (temperature, method) with the relative error of the summed fkl over
every response token, and for the sampled rest its spread over 5 sampling seeds.
"""
import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def rows(model, tok, sample, system):
    user = sample["instruction"] + ("\n\n" + sample["context"] if sample.get("context") else "")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    resp = tok(sample["response"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt) + resp])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(resp)]


def fkl_rows(z, s, T):
    lp, lq = torch.log_softmax(z / T, -1), torch.log_softmax(s / T, -1)
    return lp, lq, (lp.exp() * (lp - lq)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("student")
    ap.add_argument("data")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--m", type=int, default=16, help="sampled rest tokens out of the K")
    ap.add_argument("--system", default="Answer briefly.")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, torch_dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(a.student, torch_dtype=torch.float32).eval()
    samples = [json.loads(l) for l in open(a.data)][: a.samples]
    zs, ss = [], []
    for smp in samples:
        zs.append(rows(teacher, tok, smp, a.system))
        ss.append(rows(student, tok, smp, a.system))
    z, s = torch.cat(zs), torch.cat(ss)
    temps = [1.0, 4 / 3, 5 / 3, 2.0]
    T0 = max(temps)
    order = z.argsort(-1, descending=True)
    for T in temps:
        lp, lq, dense = fkl_rows(z, s, T)
        full = dense.sum().item()
        p, q = lp.exp(), lq.exp()
        # Bucket: top K exact, the rest as one bucket (what the cache does today).
        top = order[:, : a.k]
        in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top, True)
        P = torch.where(in_top, p, 0).sum(-1)
        Q = torch.where(in_top, q, 0).sum(-1)
        head = torch.where(in_top, p * (lp - lq), 0).sum(-1)
        R, QR = (1 - P).clamp_min(1e-300), (1 - Q).clamp_min(1e-300)
        bucket = (head + R * (R / QR).log()).sum().item()
        print(json.dumps({"T": round(T, 3), "method": f"bucket K={a.k}", "rel_err": abs(bucket - full) / full}))
        # Sampled rest: K - M top tokens exact, M samples from the teacher's rest at T0.
        kt = a.k - a.m
        top = order[:, :kt]
        in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top, True)
        head = torch.where(in_top, p * (lp - lq), 0).sum(-1)
        lp0 = torch.log_softmax(z / T0, -1)
        pi = torch.where(in_top, 0, lp0.exp())
        pi = pi / pi.sum(-1, keepdim=True)
        errs = []
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            j = torch.multinomial(pi.float(), a.m, replacement=True, generator=g)
            pj, lpj, lqj, pij = p.gather(1, j), lp.gather(1, j), lq.gather(1, j), pi.gather(1, j)
            rest = (pj / pij * (lpj - lqj)).mean(-1)
            est = (head + rest).sum().item()
            errs.append(abs(est - full) / full)
        print(json.dumps({"T": round(T, 3), "method": f"top {kt} + {a.m} sampled", "rel_err_seeds": errs,
                          "rel_err_mean": sum(errs) / len(errs)}))


if __name__ == "__main__":
    main()
