//! The Porter stemmer exactly as NLTK implements it in its default `NLTK_EXTENSIONS` mode
//! (`nltk/stem/porter.py`), which is what rouge-score's `use_stemmer=True` calls.
//!
//! The structure follows NLTK step by step (rule order and conditions matter: a rule whose suffix
//! matches but whose condition fails stops the rule list, as in NLTK's `_apply_rule_list`).
//! Words are handled as `char` sequences because NLTK indexes Python strings by code point.

type Word = Vec<char>;

/// NLTK_EXTENSIONS' irregular forms, looked up before any rule.
const IRREGULAR: &[(&str, &str)] = &[
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// Stems one word (lower-cased first, as NLTK's `stem(word, to_lowercase=True)`).
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == lower) {
        return s.to_string();
    }
    // NLTK tests the length of the word as given, before lower-casing.
    if word.chars().count() <= 2 {
        return lower;
    }
    let mut w: Word = lower.chars().collect();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    w.into_iter().collect()
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Consonant flags for every position: `y` is a consonant at the start or after a vowel.
fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[char], i: usize) -> bool {
    consonant_flags(&w[..=i])[i]
}

/// m in [C](VC){m}[V]: the number of vowel->consonant transitions.
fn measure(w: &[char]) -> usize {
    let f = consonant_flags(w);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(w: &[char]) -> bool {
    consonant_flags(w).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// Condition *o, plus NLTK's extension: a two-letter word vowel + consonant also counts.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let s: Vec<char> = suffix.chars().collect();
    w.len() >= s.len() && w[w.len() - s.len()..] == s[..]
}

fn without(w: &[char], suffix: &str) -> Word {
    w[..w.len() - suffix.chars().count()].to_vec()
}

fn with(mut stem: Word, replacement: &str) -> Word {
    stem.extend(replacement.chars());
    stem
}

type Cond<'a> = Option<&'a dyn Fn(&[char]) -> bool>;

/// NLTK's `_apply_rule_list` for plain suffixes: the first rule whose suffix matches decides.
fn apply_rules(w: Word, rules: &[(&str, &str, Cond)]) -> Word {
    for (suffix, replacement, cond) in rules {
        if ends_with(&w, suffix) {
            let stem = without(&w, suffix);
            return if cond.is_none_or(|c| c(&stem)) {
                with(stem, replacement)
            } else {
                w
            };
        }
    }
    w
}

fn positive_measure(s: &[char]) -> bool {
    measure(s) > 0
}

fn measure_gt_1(s: &[char]) -> bool {
    measure(s) > 1
}

fn step1a(w: Word) -> Word {
    if ends_with(&w, "ies") && w.len() == 4 {
        return with(without(&w, "ies"), "ie");
    }
    apply_rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    )
}

fn step1b(w: Word) -> Word {
    if ends_with(&w, "ied") {
        let repl = if w.len() == 4 { "ie" } else { "i" };
        return with(without(&w, "ied"), repl);
    }
    if ends_with(&w, "eed") {
        let stem = without(&w, "eed");
        return if measure(&stem) > 0 {
            with(stem, "ee")
        } else {
            w
        };
    }
    let mut stem = None;
    for suffix in ["ed", "ing"] {
        if ends_with(&w, suffix) {
            let s = without(&w, suffix);
            if contains_vowel(&s) {
                stem = Some(s);
                break;
            }
        }
    }
    let Some(s) = stem else { return w };
    // The rule list applied to the intermediate stem: AT/BL/IZ get their E back, a double
    // consonant (except l, s, z) loses one letter, and a short cvc stem gets an E.
    for (suffix, repl) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if ends_with(&s, suffix) {
            return with(without(&s, suffix), repl);
        }
    }
    if ends_double_consonant(&s) {
        let last = s[s.len() - 1];
        return if matches!(last, 'l' | 's' | 'z') {
            s
        } else {
            s[..s.len() - 1].to_vec()
        };
    }
    if measure(&s) == 1 && ends_cvc(&s) {
        return with(s, "e");
    }
    s
}

fn step1c(w: Word) -> Word {
    let cond = |s: &[char]| s.len() > 1 && is_consonant(s, s.len() - 1);
    apply_rules(w, &[("y", "i", Some(&cond))])
}

fn step2(w: Word) -> Word {
    if ends_with(&w, "alli") && positive_measure(&without(&w, "alli")) {
        return step2(with(without(&w, "alli"), "al"));
    }
    let m: Cond = Some(&positive_measure);
    // NLTK's "logi" rule measures the word minus "ogi" (keeping the l), not the stem.
    let logi_stem_l = w.len() >= 3 && positive_measure(&w[..w.len() - 3]);
    let logi = move |_: &[char]| logi_stem_l;
    let rules: [(&str, &str, Cond); 22] = [
        ("ational", "ate", m),
        ("tional", "tion", m),
        ("enci", "ence", m),
        ("anci", "ance", m),
        ("izer", "ize", m),
        ("bli", "ble", m),
        ("alli", "al", m),
        ("entli", "ent", m),
        ("eli", "e", m),
        ("ousli", "ous", m),
        ("ization", "ize", m),
        ("ation", "ate", m),
        ("ator", "ate", m),
        ("alism", "al", m),
        ("iveness", "ive", m),
        ("fulness", "ful", m),
        ("ousness", "ous", m),
        ("aliti", "al", m),
        ("iviti", "ive", m),
        ("biliti", "ble", m),
        ("fulli", "ful", m),
        ("logi", "log", Some(&logi)),
    ];
    apply_rules(w, &rules)
}

fn step3(w: Word) -> Word {
    let m: Cond = Some(&positive_measure);
    apply_rules(
        w,
        &[
            ("icate", "ic", m),
            ("ative", "", m),
            ("alize", "al", m),
            ("iciti", "ic", m),
            ("ical", "ic", m),
            ("ful", "", m),
            ("ness", "", m),
        ],
    )
}

fn step4(w: Word) -> Word {
    let m: Cond = Some(&measure_gt_1);
    let ion = |s: &[char]| measure(s) > 1 && matches!(s.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            ("al", "", m),
            ("ance", "", m),
            ("ence", "", m),
            ("er", "", m),
            ("ic", "", m),
            ("able", "", m),
            ("ible", "", m),
            ("ant", "", m),
            ("ement", "", m),
            ("ment", "", m),
            ("ent", "", m),
            ("ion", "", Some(&ion)),
            ("ou", "", m),
            ("ism", "", m),
            ("ate", "", m),
            ("iti", "", m),
            ("ous", "", m),
            ("ive", "", m),
            ("ize", "", m),
        ],
    )
}

fn step5a(w: Word) -> Word {
    if ends_with(&w, "e") {
        let stem = without(&w, "e");
        let m = measure(&stem);
        if m > 1 || (m == 1 && !ends_cvc(&stem)) {
            return stem;
        }
    }
    w
}

fn step5b(w: Word) -> Word {
    // NLTK measures the word minus its last letter here, not minus "ll".
    if ends_with(&w, "ll") && measure(&w[..w.len() - 1]) > 1 {
        return w[..w.len() - 1].to_vec();
    }
    w
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn classic_examples() {
        for (w, s) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("running", "run"),
            ("runs", "run"),
            ("ran", "ran"),
            ("happy", "happi"),
            ("enjoy", "enjoy"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("skies", "sky"),
            ("dying", "die"),
            ("controlling", "control"),
            ("hopping", "hop"),
            ("filing", "file"),
        ] {
            assert_eq!(stem(w), s, "{w}");
        }
    }
}
