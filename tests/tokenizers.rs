//! Tokenizer parity with Python `tokenizers` (tests/fixtures/tokenizers, made by tools/make_fixtures.py)
//! on hard strings: unicode, CJK, emoji, whitespace runs, CRLF, contractions, code.

use pocl::tokenizer::Tokenizer;
use std::path::PathBuf;

fn check(kind: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizers")
        .join(kind);
    let tok = Tokenizer::from_dir(&dir, None).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 10, "{kind}: too few cases");
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, want, "{kind}: ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{kind}: decode of {text:?}"
        );
    }
}

#[test]
fn gpt2_byte_level_bpe() {
    check("gpt2");
}

#[test]
fn qwen2_split_regex_with_lookahead() {
    check("qwen2");
}

#[test]
fn llama_byte_fallback() {
    check("llama");
}

#[test]
fn llama2_legacy_normalizer_form() {
    check("llama-legacy");
}
