#!/usr/bin/env python3
"""Regenerates tests/fixtures/data/: a tiny GPT-2-style byte-level BPE tokenizer, hand-written
Dolly and Alpaca samples, and the token ids / labels / masks that DistiLLM's reference pipeline
(tools/process_data_dolly.py's Encoder + data_utils/lm_datasets.py's _process_lm) produces for them
through transformers' tokenizer, at several (max_prompt_len, max_len) limits.

Requires `pip install tokenizers transformers`. Usage: python3 tools/make_data_fixtures.py [OUT_DIR]
"""

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "tests", "fixtures", "data")

NO_INPUT = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

DOLLY = [
    {"instruction": "Name three primary colors.", "context": "", "response": "Red, yellow and blue.",
     "category": "open_qa"},
    {"instruction": "Summarize the text.", "context": "The fox jumped over the lazy dog twice.",
     "response": "A fox jumped over a dog.", "category": "summarization"},
    # The response starts with a space and a newline: BPE merges across the prompt boundary.
    {"instruction": "Say hello.", "context": "", "response": " hello\n\nworld", "category": "x"},
    # Starts with spaces: the pre-token "\n  " spans the boundary and merges into one token.
    {"instruction": "Indent the word.", "context": "", "response": "  indented", "category": "x"},
    {"instruction": "Translate to French: café", "context": "   ", "response": "Un café, s'il vous plaît.",
     "category": "brainstorming"},
    {"instruction": "Count the words in {input} and braces {}", "context": "one two {three}",
     "response": "3", "category": "classification"},
]
ALPACA = [
    {"instruction": "Give an antonym of hot.", "input": "", "output": "cold"},
    {"instruction": "Sort the list.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": "Write a long answer about the weather in the mountains during the winter months.",
     "input": "Alps", "output": "It is cold and snowy for many weeks, with strong winds on the ridges."},
    {"instruction": "Reply with unicode.", "output": "Ünïcödé ✓ 東京"},
]
LIMITS = [(256, 512), (20, 30), (85, 90), (120, 125)]


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [NO_INPUT, WITH_INPUT] + [json.dumps(r) for r in DOLLY + ALPACA] * 3 + ["a:\n  b:\n  c"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def reference(hf, rec, max_prompt, max_len):
    """DistiLLM's Encoder.encode and LMTrainDataset._process_lm, for one record."""
    if "input" not in rec or len(rec["input"]) == 0:
        prompt = NO_INPUT.format(instruction=rec["instruction"])
    else:
        prompt = WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    response = rec["output"]
    prompt_tokens = hf.encode(prompt, add_special_tokens=False)
    full = hf.encode(prompt + response, add_special_tokens=False) + [hf.eos_token_id]
    response_tokens = full[len(prompt_tokens):]
    prompt_tokens = prompt_tokens[:max_prompt]
    seq = (prompt_tokens + response_tokens)[:max_len]
    source_len = len(prompt_tokens)
    n = len(seq) - 1
    return {
        "prompt": prompt,
        "prompt_ids": prompt_tokens,
        "response_ids": seq[source_len:],
        "input_ids": seq[:-1],
        "labels": seq[1:],
        "loss_mask": [0.0 if i < source_len - 1 else 1.0 for i in range(n)],
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = train_tokenizer()
    path = os.path.join(OUT, "tokenizer.json")
    tok.save(path)
    hf = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")
    with open(os.path.join(OUT, "dolly.jsonl"), "w", encoding="utf-8") as f:
        for r in DOLLY:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "alpaca.jsonl"), "w", encoding="utf-8") as f:
        for r in ALPACA:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    out = []
    for fname, recs in [("dolly.jsonl", DOLLY), ("alpaca.jsonl", ALPACA)]:
        for i, r in enumerate(recs):
            rec = {"instruction": r["instruction"], "input": r.get("context", r.get("input", "")),
                   "output": r.get("response", r.get("output"))}
            if "input" not in r and "context" not in r:
                del rec["input"]
            for mp, ml in LIMITS:
                e = reference(hf, rec, mp, ml)
                e.update({"file": fname, "line": i + 1, "max_prompt_len": mp, "max_len": ml})
                out.append(e)
    with open(os.path.join(OUT, "expected.jsonl"), "w", encoding="utf-8") as f:
        for e in out:
            f.write(json.dumps(e, ensure_ascii=True) + "\n")
    print(f"vocab {tok.get_vocab_size()}, {len(out)} expected encodings -> {OUT}")


if __name__ == "__main__":
    main()
