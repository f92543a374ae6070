//! Tokenization, truncation and masks against DistiLLM's reference pipeline: the expected ids in
//! tests/fixtures/data/expected.jsonl come from tools/make_data_fixtures.py (transformers'
//! tokenizer + the reference Encoder and collate logic) for hand-written Dolly and Alpaca samples.

use pocl::data::{
    collate, encode_sample, encode_samples, load_jsonl, prompt_ids, EncodeOptions, Example, Format,
    LoadOptions, Sample, SkipReason, Template,
};
use pocl::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("tokenizer.json"), None).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn samples(file: &str) -> Vec<Sample> {
    load_jsonl(&fixture(file), LoadOptions::default())
        .unwrap()
        .samples
}

fn row_u32(t: &candle_core::Tensor, r: usize) -> Vec<u32> {
    t.get(r).unwrap().to_vec1::<u32>().unwrap()
}

fn row_f32(t: &candle_core::Tensor, r: usize) -> Vec<f32> {
    t.get(r).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn formats_are_detected() {
    assert_eq!(
        load_jsonl(&fixture("dolly.jsonl"), LoadOptions::default())
            .unwrap()
            .format,
        Format::Dolly
    );
    assert_eq!(
        load_jsonl(&fixture("alpaca.jsonl"), LoadOptions::default())
            .unwrap()
            .format,
        Format::Alpaca
    );
    let d = samples("dolly.jsonl");
    assert_eq!(d[1].input, "The fox jumped over the lazy dog twice.");
    assert_eq!(d[1].category, "summarization");
    assert_eq!(
        d.iter().map(|s| s.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn encodings_match_the_reference_pipeline() {
    let tok = tokenizer();
    let eos = tok.eos_id.unwrap();
    let text = std::fs::read_to_string(fixture("expected.jsonl")).unwrap();
    let (dolly, alpaca) = (samples("dolly.jsonl"), samples("alpaca.jsonl"));
    let mut n = 0;
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let set = if e["file"] == "dolly.jsonl" {
            &dolly
        } else {
            &alpaca
        };
        let s = set
            .iter()
            .find(|s| s.id == e["line"].as_u64().unwrap())
            .unwrap();
        let opts = EncodeOptions {
            template: Template::Alpaca,
            max_prompt_len: e["max_prompt_len"].as_u64().unwrap() as usize,
            max_len: e["max_len"].as_u64().unwrap() as usize,
        };
        let ctx = format!(
            "{} line {} limits {}/{}",
            e["file"], e["line"], opts.max_prompt_len, opts.max_len
        );
        assert_eq!(
            Template::Alpaca.prompt(s),
            e["prompt"].as_str().unwrap(),
            "{ctx}"
        );
        let ex = encode_sample(&tok, s, &opts).unwrap().unwrap();
        assert_eq!(ex.id, s.id);
        assert_eq!(ex.prompt_ids, ids(&e["prompt_ids"]), "{ctx}: prompt ids");
        assert_eq!(
            ex.response_ids,
            ids(&e["response_ids"]),
            "{ctx}: response ids"
        );
        assert_eq!(
            prompt_ids(&tok, s, &opts).unwrap(),
            ex.prompt_ids,
            "{ctx}: generation prompt"
        );
        assert!(
            ex.prompt_ids.len() <= opts.max_prompt_len && ex.len() <= opts.max_len,
            "{ctx}"
        );
        if opts.max_len == 512 {
            assert_eq!(
                *ex.response_ids.last().unwrap(),
                eos,
                "{ctx}: EOS ends the response"
            );
        }
        let b = collate(&[&ex], eos).unwrap();
        assert_eq!(
            row_u32(&b.input_ids, 0),
            ids(&e["input_ids"]),
            "{ctx}: input"
        );
        assert_eq!(row_u32(&b.labels, 0), ids(&e["labels"]), "{ctx}: labels");
        let mask: Vec<f32> = e["loss_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(row_f32(&b.loss_mask, 0), mask, "{ctx}: loss mask");
        assert_eq!(b.response_tokens(), ex.response_ids.len());
        n += 1;
    }
    assert_eq!(n, 40);
}

#[test]
fn truncation_at_both_limits() {
    let tok = tokenizer();
    let eos = tok.eos_id.unwrap();
    let s = &samples("alpaca.jsonl")[2]; // long instruction, long answer
    let full = encode_sample(&tok, s, &EncodeOptions::default())
        .unwrap()
        .unwrap();
    assert_eq!(*full.response_ids.last().unwrap(), eos);
    // Prompt limit: the first tokens are kept, the response is untouched.
    let opts = EncodeOptions {
        max_prompt_len: 10,
        max_len: 512,
        ..Default::default()
    };
    let e = encode_sample(&tok, s, &opts).unwrap().unwrap();
    assert_eq!(e.prompt_ids, full.prompt_ids[..10]);
    assert_eq!(e.response_ids, full.response_ids);
    // Total limit: the response is cut and loses its EOS.
    let max_len = full.prompt_ids.len() + 5;
    let opts = EncodeOptions {
        max_prompt_len: 256,
        max_len,
        ..Default::default()
    };
    let e = encode_sample(&tok, s, &opts).unwrap().unwrap();
    assert_eq!(e.prompt_ids, full.prompt_ids);
    assert_eq!(e.response_ids, full.response_ids[..5]);
    assert_eq!(e.len(), max_len);
    let enc = encode_samples(&tok, std::slice::from_ref(s), &opts).unwrap();
    assert_eq!((enc.truncated_prompts, enc.truncated_responses), (0, 1));
    let opts = EncodeOptions {
        max_prompt_len: 10,
        max_len: 512,
        ..Default::default()
    };
    let enc = encode_samples(&tok, std::slice::from_ref(s), &opts).unwrap();
    assert_eq!((enc.truncated_prompts, enc.truncated_responses), (1, 0));
}

#[test]
fn empty_responses_and_full_prompts_are_reported() {
    let tok = tokenizer();
    let mut data = samples("alpaca.jsonl");
    data[0].response = String::new();
    data[1].response = " \n ".into();
    let opts = EncodeOptions {
        max_prompt_len: 200,
        max_len: 100,
        ..Default::default()
    };
    let enc = encode_samples(&tok, &data, &opts).unwrap();
    // Sample 3's prompt (132 tokens) is kept up to 200 tokens but max_len is 100: no room.
    assert_eq!(
        enc.skipped,
        [
            (1, SkipReason::EmptyResponse),
            (2, SkipReason::EmptyResponse),
            (3, SkipReason::NoRoomForResponse)
        ]
    );
    assert_eq!(enc.examples.iter().map(|e| e.id).collect::<Vec<_>>(), [4]);
    let summary = enc.summary().unwrap();
    assert!(
        summary.contains("2 with an empty response") && summary.contains("1 whose prompt"),
        "{summary}"
    );
    assert!(EncodeOptions {
        max_prompt_len: 0,
        ..Default::default()
    }
    .validate()
    .is_err());
}

#[test]
fn plain_template_and_processed_prompts() {
    let s = Sample::new(1, "Reverse: a b", "", "b a");
    assert_eq!(Template::Plain.prompt(&s), "Reverse: a b\nAnswer:\n");
    let s = Sample::new(1, "Reverse", "a b", "b a");
    assert_eq!(Template::Plain.prompt(&s), "Reverse\na b\nAnswer:\n");
    // Braces in the data are not template slots.
    let s = Sample::new(1, "say {input}", "{instruction}", "x");
    assert!(Template::Alpaca
        .prompt(&s)
        .contains("### Instruction:\nsay {input}\n\n### Input:\n{instruction}\n\n"));
    let mut s = Sample::new(1, "ignored", "", "x");
    s.prompt = Some("verbatim prompt\n".into());
    assert_eq!(Template::Alpaca.prompt(&s), "verbatim prompt\n");
}

#[test]
fn batches_pad_right_and_mask_only_the_response() {
    let pad = 0;
    let a = Example {
        id: 7,
        prompt_ids: vec![10, 11, 12],
        response_ids: vec![20, 21, 99],
    };
    let b = Example {
        id: 3,
        prompt_ids: vec![10],
        response_ids: vec![99],
    };
    let batch = collate(&[&a, &b], pad).unwrap();
    assert_eq!(batch.ids, [7, 3]);
    assert_eq!(batch.input_ids.dims(), [2, 5]);
    assert_eq!(row_u32(&batch.input_ids, 0), [10, 11, 12, 20, 21]);
    assert_eq!(row_u32(&batch.labels, 0), [11, 12, 20, 21, 99]);
    assert_eq!(row_f32(&batch.loss_mask, 0), [0., 0., 1., 1., 1.]);
    assert_eq!(row_f32(&batch.attention_mask, 0), [1.; 5]);
    assert_eq!(row_u32(&batch.position_ids, 0), [0, 1, 2, 3, 4]);
    assert_eq!(row_u32(&batch.input_ids, 1), [10, 0, 0, 0, 0]);
    assert_eq!(row_u32(&batch.labels, 1), [99, 0, 0, 0, 0]);
    assert_eq!(row_f32(&batch.loss_mask, 1), [1., 0., 0., 0., 0.]);
    assert_eq!(row_f32(&batch.attention_mask, 1), [1., 0., 0., 0., 0.]);
    assert_eq!(row_u32(&batch.position_ids, 1), [0, 0, 0, 0, 0]);
    assert_eq!(batch.response_tokens(), 4);
    assert!(collate(&[], pad).is_err());
    let bad = Example {
        id: 1,
        prompt_ids: vec![1, 2],
        response_ids: vec![],
    };
    assert!(collate(&[&bad], pad).is_err());
}
