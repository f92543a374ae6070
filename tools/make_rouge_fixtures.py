#!/usr/bin/env python3
"""Regenerates tests/fixtures/rouge/ from the reference implementations.

Requires `pip install rouge-score nltk`. Writes:
  porter.tsv   word <TAB> NLTK PorterStemmer (NLTK_EXTENSIONS) stem, for words built to hit every rule
  cases.jsonl  one object per prediction/references pair: rouge-score tokens, per-reference
               ROUGE-L F1 (use_stemmer=True), its max x100, and DistiLLM's exact match
  corpus.json  the corpus means as DistiLLM computes them (100 * sum / n, not rounded)
Deterministic: a fixed seed, no dependence on dict order or the clock.

Usage: python3 tools/make_rouge_fixtures.py [OUT_DIR]   (default tests/fixtures/rouge)
"""

import json
import os
import random
import re
import string
import sys

import nltk
import rouge_score
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "tests", "fixtures", "rouge")

rng = random.Random(20250605)
stemmer = porter.PorterStemmer()
scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
tok = tokenizers.DefaultTokenizer(use_stemmer=True)


# DistiLLM / Natural-Instructions exact match (articles kept).
def normalize_answer(s):
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    return " ".join(s.split())


# ---------------------------------------------------------------- Porter words
ROOTS = """run hop hope happy sky die lie tie fly spy try cry relate connect general sense formal
electric good adjust depend adopt commun conform radical different vile analog vietnam predic
oper feud decis call sensit sensib trouble size fizz hiss fall fail file tan agree feed plaster
bled motor sing care pony tie cat cease rate probate control roll trip trap agree bowdler activ
effect homolog angular replac irrit defens airlin infer allow reviv gyroscop triplic form hopeful
goodness digit valen hesit condition ration ration nation station cement element argument
national dental bill toll fill will skill yell dye eye yoyo syzygy toy enjoy play boy
archaeolog geolog analog apolog biolog theolog news innings outing canning howe proceed exceed
succeed succeeded proceeding exceeding ied ies eed ing ed ly y""".split()
SUFFIXES = ["", "s", "es", "ies", "ied", "ed", "ing", "ly", "er", "ers", "est", "ation", "ational",
            "tional", "ness", "ful", "fully", "fulli", "fulness", "ize", "izer", "ization", "izing",
            "able", "ably", "abli", "bli", "ibly", "ible", "ance", "anci", "ence", "enci", "ment",
            "ement", "ent", "entli", "eli", "ism", "ist", "ive", "iveness", "ous", "ously", "ousli",
            "ousness", "ical", "icate", "iciti", "al", "alli", "ally", "alism", "aliti", "iviti",
            "biliti", "logi", "logy", "eed", "sses", "ss", "ll", "y", "ies", "ate", "ator", "iti",
            "ion", "sion", "tion", "ou", "ant", "ative", "alize", "e", "ee", "at", "bl", "iz"]
IRREGULAR = ["sky", "skies", "dying", "lying", "tying", "news", "innings", "inning", "outings",
             "outing", "cannings", "canning", "howe", "proceed", "exceed", "succeed"]
CLASSIC = """caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated
troubled sized hopping tanned falling hissing fizzed failing filing happy sky relational conditional
rational valenci hesitanci digitizer conformabli radicalli differentli vileli analogousli
vietnamization predication operator feudalism decisiveness hopefulness callousness formaliti
sensitiviti sensibiliti triplicate formative formalize electriciti electrical hopeful goodness
revival allowance inference airliner gyroscopic adjustable defensible irritant replacement
adjustment dependent adoption homologou communism activate angulariti homologous effective
bowdlerize probate rate cease controll roll generously generalizations running runs ran runner
runners studies studied studying flies flying dies died lies lied ties tied spied tried cried
abilities ability agreement agreements 1990s 2nd 3rd 100th mp3s covid19 a1b2 yyyy yyyyy ayyy
aaaa bbbb eeee zzzz xxxx oed ied ies eed ying ying1 really quickly happily""".split()


def porter_words():
    words = set(ROOTS) | set(IRREGULAR) | set(CLASSIC)
    for r in ROOTS:
        for s in SUFFIXES:
            words.add(r + s)
    letters = "aeiouyybcdlmnrstwxz"
    for _ in range(1500):
        n = rng.randint(1, 12)
        words.add("".join(rng.choice(letters) for _ in range(n)))
    for _ in range(200):
        n = rng.randint(2, 8)
        words.add("".join(rng.choice(letters + "0123456789") for _ in range(n)))
    return sorted(words)


# ---------------------------------------------------------------- ROUGE cases
VOCAB = """the a an of to and in is was were be been running runs ran run runner jumped jumping jumps
quick quickly brown fox dog dogs lazy over under cat cats happiness happy happier studies study
studied generalization general generally connection connected connecting connects organize
organization organizational relation relational relate relativity city cities country countries
is are 3 14 2024 1,000 3.14 42nd covid-19 e-mail o'clock don't can't it's U.S.A. Dr. Mr. Smith""".split()
UNICODE = ["café", "naïve", "İstanbul", "\u212aelvin", "Straße", "ÆON", "ǅungla", "Ωmega", "σοφία",
           "東京", "日本語のテキスト", "😀", "emoji😀word", "fiancé", "coöperate", "ｆｕｌｌｗｉｄｔｈ", "x\u0301y",
           "\u00a0nbsp\u00a0", "tab\there", "new\nline", "sep\x1cfs", "zero\u200bwidth", "Ⅻ", "²³", "٣٤"]
PUNCT = [".", ",", "!", "?", ";", ":", "-", "--", "...", "'", '"', "(", ")", "[", "]", "/", "&", "%",
         "$", "#", "@", "*", "_", "~", "`"]


def random_text(max_words):
    words = []
    for _ in range(rng.randint(0, max_words)):
        r = rng.random()
        if r < 0.75:
            w = rng.choice(VOCAB)
        elif r < 0.85:
            w = rng.choice(UNICODE)
        elif r < 0.93:
            w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
        else:
            w = rng.choice(PUNCT)
        c = rng.random()
        if c < 0.15:
            w = w.upper()
        elif c < 0.3:
            w = w.capitalize()
        if rng.random() < 0.2:
            w += rng.choice(PUNCT)
        words.append(w)
    seps = [" ", " ", " ", "  ", "\n", "\t", "-"]
    out = ""
    for i, w in enumerate(words):
        out += (rng.choice(seps) if i else "") + w
    return out


def perturb(text):
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.3:
            out.append(rng.choice(VOCAB))
        elif r < 0.4:
            out.append(w.upper())
        else:
            out.append(w)
        if rng.random() < 0.05:
            out.append(rng.choice(VOCAB))
    return " ".join(out)


HAND = [
    ("", [""]),
    ("", ["a reference"]),
    ("a prediction", [""]),
    ("...", ["!!!"]),
    ("The cat is running.", ["the cats ran"]),
    ("runs running ran runner", ["run"]),
    ("Running, runs & ran!", ["RUNNING RUNS RAN"]),
    ("generalizations of organizational relativity", ["general organization relative"]),
    ("happiness happier happily", ["happy"]),
    ("studies studied studying", ["study"]),
    ("flies flying fly", ["fli"]),
    ("dying lying tying", ["die lie tie"]),
    ("skies sky", ["sky"]),
    ("The answer is 42.", ["the answer is 42"]),
    ("The answer is 42.", ["The answer is forty-two.", "answer: 42", "42"]),
    ("3.14 is pi", ["pi is 3.14"]),
    ("1,000 dollars", ["1000 dollars"]),
    ("café naïve", ["caf na ve"]),
    ("İstanbul", ["i stanbul"]),
    ("\u212aelvin", ["kelvin"]),
    ("東京 Tokyo", ["tokyo"]),
    ("😀", ["😀"]),
    ("sep\x1cfs", ["sep fs"]),
    ("a\u00a0b", ["a b"]),
    ("The quick brown fox jumps over the lazy dog", ["The quick brown dog jumps on the log."]),
    ("an apple", ["apple"]),
    ("Yes", ["yes."]),
    ("  spaced   out  ", ["spaced out"]),
    ("don't can't won't", ["do not cannot will not"]),
    ("e-mail covid-19", ["email covid19"]),
    ("x" * 5, ["xxxxx"]),
    ("yyyy aaaa", ["yyyy aaaa"]),
    ("1990s mp3s", ["1990 mp3"]),
    ("ÀÉÎÕÜ", ["aeiou"]),
    ("ǅ", ["dž"]),
    ("ΣΑΣ", ["σας"]),
]


def case(pred, refs):
    fs = [scorer.score(r, pred)["rougeL"].fmeasure for r in refs]
    em = max(normalize_answer(pred) == normalize_answer(r) for r in refs)
    return {
        "prediction": pred,
        "references": refs,
        "prediction_tokens": tok.tokenize(pred),
        "reference_tokens": [tok.tokenize(r) for r in refs],
        "fmeasures": fs,
        # rouge-score's score_multi / DistiLLM's max over ground truths, x100
        "rougeL": 100.0 * max(fs),
        "exact_match": bool(em),
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    words = porter_words()
    with open(os.path.join(OUT, "porter.tsv"), "w", encoding="utf-8") as f:
        for w in words:
            f.write(f"{w}\t{stemmer.stem(w)}\n")

    cases = [case(p, r) for p, r in HAND]
    for _ in range(340):
        ref = random_text(25)
        r = rng.random()
        if r < 0.6:
            pred = perturb(ref)
        elif r < 0.9:
            pred = random_text(25)
        else:
            pred = ref
        refs = [ref] + [perturb(ref) if rng.random() < 0.5 else random_text(15)
                        for _ in range(rng.choice([0, 0, 0, 1, 2]))]
        cases.append(case(pred, refs))
    with open(os.path.join(OUT, "cases.jsonl"), "w", encoding="utf-8") as f:
        for c in cases:
            f.write(json.dumps(c, ensure_ascii=True) + "\n")

    n = len(cases)
    total_f = sum(max(c["fmeasures"]) for c in cases)
    total_em = sum(c["exact_match"] for c in cases)
    corpus = {
        "rougeL": 100.0 * total_f / n,
        "exact_match": 100.0 * total_em / n,
        "n": n,
        "nltk": nltk.__version__,
        "rouge_score": getattr(rouge_score, "__version__", "0.1.2"),
    }
    with open(os.path.join(OUT, "corpus.json"), "w") as f:
        json.dump(corpus, f, indent=1)
        f.write("\n")
    print(f"{len(words)} porter words, {n} rouge cases -> {OUT}")


if __name__ == "__main__":
    main()
