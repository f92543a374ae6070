//! Chat templates (issue 14 item 2): renders identical to transformers' `apply_chat_template`
//! (tests/fixtures/chat/expected.json, written by tools/make_chat_fixtures.py), conversation data
//! (messages and ShareGPT JSONL) and its training pairs, and the bad inputs.

use pocl::data::chat::prepare;
use pocl::data::{
    encode_sample, load_jsonl, ChatTemplate, EncodeOptions, Format, LoadOptions, Message, Template,
};
use std::path::{Path, PathBuf};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat")
        .join(p)
}

fn template(name: &str) -> ChatTemplate {
    ChatTemplate::load(&fixture(name)).unwrap().unwrap()
}

/// A fresh directory per test (tests run in parallel threads of one process).
fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pocl-chat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn renders_match_transformers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let t = template(case["template"].as_str().unwrap());
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = t.render(&messages, case["add_generation_prompt"].as_bool().unwrap());
        match (&case["expected"], &case["error"]) {
            (serde_json::Value::String(want), _) => {
                assert_eq!(got.unwrap(), *want, "{case}")
            }
            (_, serde_json::Value::String(err)) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(err.as_str()), "{e}");
                assert!(e.contains("tokenizer_config.json: the chat template fails to render"));
                assert_eq!(e.lines().count(), 1, "{e}");
            }
            _ => panic!("bad fixture case {case}"),
        }
    }
}

#[test]
fn end_of_turn_is_what_follows_the_assistant_content() {
    assert_eq!(template("qwen2").end_of_turn().unwrap(), "<|im_end|>\n");
    assert_eq!(template("llama3").end_of_turn().unwrap(), "<|eot_id|>\n");
    assert_eq!(template("mistral").end_of_turn().unwrap(), "</s>");
}

#[test]
fn chat_template_jinja_wins_over_tokenizer_config() {
    let dir = tmpdir("jinja");
    std::fs::copy(
        fixture("qwen2/tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    write(
        &dir,
        "chat_template.jinja",
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}",
    );
    let t = ChatTemplate::load(&dir).unwrap().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], true).unwrap(),
        "[user]hi\n"
    );
}

fn chatml_prompt(system: Option<&str>, turns: &[(&str, &str)]) -> String {
    let mut s = format!(
        "<|im_start|>system\n{}<|im_end|>\n",
        system.unwrap_or("You are a helpful assistant.")
    );
    for (role, text) in turns {
        s += &format!("<|im_start|>{role}\n{text}<|im_end|>\n");
    }
    s + "<|im_start|>assistant\n"
}

#[test]
fn messages_and_sharegpt_give_the_same_training_pairs() {
    for (file, format) in [
        ("messages.jsonl", Format::Messages),
        ("sharegpt.jsonl", Format::ShareGpt),
    ] {
        let path = fixture(&format!("data/{file}"));
        let loaded = load_jsonl(&path, LoadOptions::default()).unwrap();
        assert_eq!(loaded.format, format);
        let mut samples = loaded.samples;
        assert_eq!(samples[1].messages.len(), 4);
        prepare(&mut samples, Template::Chat, None, &fixture("qwen2"), &path).unwrap();
        assert_eq!(
            samples[0].prompt.as_deref().unwrap(),
            chatml_prompt(Some("Answer briefly."), &[("user", "Capital of France?")])
        );
        assert_eq!(samples[0].response, "Paris.");
        // The prompt is everything before the LAST assistant turn, earlier answers included.
        assert_eq!(
            samples[1].prompt.as_deref().unwrap(),
            chatml_prompt(
                None,
                &[("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")]
            )
        );
        assert_eq!(samples[1].response, "6");
        assert_eq!(samples[1].references(), vec!["6"]);
        assert!(samples.iter().all(|s| s.end_of_turn == "<|im_end|>"));
    }
}

#[test]
fn instruction_data_in_the_chat_template() {
    let dir = tmpdir("instr");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n",
    );
    let mut samples = load_jsonl(&path, LoadOptions::default()).unwrap().samples;
    prepare(&mut samples, Template::Chat, None, &fixture("qwen2"), &path).unwrap();
    assert_eq!(
        samples[0].prompt.as_deref().unwrap(),
        chatml_prompt(None, &[("user", "Add\n\n1 2")])
    );
    assert_eq!(samples[0].response, "3");
    // data.system: a system message before the user turn.
    let mut samples = load_jsonl(&path, LoadOptions::default()).unwrap().samples;
    prepare(
        &mut samples,
        Template::Chat,
        Some("Be exact."),
        &fixture("qwen2"),
        &path,
    )
    .unwrap();
    assert_eq!(
        samples[0].prompt.as_deref().unwrap(),
        chatml_prompt(Some("Be exact."), &[("user", "Add\n\n1 2")])
    );
}

#[test]
fn a_gguf_model_gives_its_template() {
    let dir = tmpdir("gguf");
    let gguf = dir.join("qwen2.gguf");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/realmodels/gguf/qwen2.gguf"),
        &gguf,
    )
    .unwrap();
    let t = ChatTemplate::load(&gguf).unwrap().unwrap();
    // The fixture's GGUF holds plain ChatML (tools/make_realmodel_fixtures.py).
    assert_eq!(
        t.render(&[Message::new("user", "hi")], true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn the_response_ends_with_one_end_of_turn_token_and_the_prompt_is_masked() {
    let tok_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/qwen2");
    let probe = pocl::tokenizer::Tokenizer::from_dir(&tok_dir, None).unwrap();
    let im_end = probe.encode("<|im_end|>").unwrap();
    assert_eq!(im_end.len(), 1);
    let tok = pocl::tokenizer::Tokenizer::from_dir(&tok_dir, Some(im_end[0])).unwrap();
    let path = fixture("data/messages.jsonl");
    let mut samples = load_jsonl(&path, LoadOptions::default()).unwrap().samples;
    prepare(&mut samples, Template::Chat, None, &fixture("qwen2"), &path).unwrap();
    let opts = EncodeOptions {
        template: Template::Chat,
        max_prompt_len: 256,
        max_len: 512,
    };
    let ex = encode_sample(&tok, &samples[1], &opts).unwrap().unwrap();
    assert_eq!(
        tok.decode(&ex.prompt_ids, false).unwrap(),
        *samples[1].prompt.as_ref().unwrap()
    );
    // Only the last answer and its end-of-turn token are trained on (response_ids); the earlier
    // answer "4" lies in the masked prompt.
    assert_eq!(tok.decode(&ex.response_ids, false).unwrap(), "6<|im_end|>");
    assert_eq!(
        ex.response_ids.iter().filter(|&&i| i == im_end[0]).count(),
        1
    );
}

fn prepare_err(template: Template, model: &str, text: &str) -> String {
    let dir = tmpdir("bad");
    let path = write(&dir, "conv.jsonl", text);
    let result = load_jsonl(&path, LoadOptions::default()).and_then(|l| {
        let mut s = l.samples;
        prepare(&mut s, template, None, &fixture(model), &path)
    });
    let e = format!("{:#}", result.unwrap_err());
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("conv.jsonl") || e.contains(model), "{e}");
    e
}

#[test]
fn bad_inputs_are_one_line_naming_file_and_line() {
    let ok = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let e = prepare_err(
        Template::Chat,
        "qwen2",
        &format!(
            "{ok}\n{}\n",
            r#"{"messages": [{"role": "user", "content": "a"}]}"#
        ),
    );
    assert!(
        e.contains("conv.jsonl:2: field \"messages\": the conversation has no assistant turn"),
        "{e}"
    );
    let e = prepare_err(
        Template::Chat,
        "qwen2",
        r#"{"conversations": [{"from": "robot", "value": "a"}]}"#,
    );
    assert!(
        e.contains("conv.jsonl:1: field \"conversations\"[0].\"from\": unknown role \"robot\""),
        "{e}"
    );
    let e = prepare_err(
        Template::Chat,
        "qwen2",
        r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}"#,
    );
    assert!(
        e.contains("conv.jsonl:1: field \"messages\"[0].field \"content\": missing"),
        "{e}"
    );
    // Mistral's template raises on roles that do not alternate.
    let e = prepare_err(
        Template::Chat,
        "mistral",
        &format!(
            "{ok}\n{}\n",
            r#"{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}"#
        ),
    );
    assert!(e.contains("conv.jsonl:2: "), "{e}");
    assert!(e.contains("the chat template fails to render"), "{e}");
    assert!(e.contains("roles must alternate"), "{e}");
    let e = prepare_err(Template::Chat, "none", ok);
    assert!(e.contains("the model has no chat template"), "{e}");
    let e = prepare_err(Template::Alpaca, "qwen2", ok);
    assert!(
        e.contains("conv.jsonl:1: a conversation record needs data.template = \"chat\""),
        "{e}"
    );
}

#[test]
fn a_template_that_does_not_parse_is_one_line() {
    let dir = tmpdir("parse");
    write(
        &dir,
        "tokenizer_config.json",
        r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
    );
    let t = ChatTemplate::load(&dir).unwrap().unwrap();
    let e = t
        .render(&[Message::new("user", "a")], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json: the chat template fails to render"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_recipe_with_the_chat_template_trains_on_the_last_answer() {
    // The tiny qwen2 model's tokenizer, with ChatML; its EOS is <|endoftext|>, not <|im_end|>.
    let student = tmpdir("recipe");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(models.join(f), student.join(f)).unwrap();
    }
    std::fs::copy(
        fixture("qwen2/tokenizer_config.json"),
        student.join("tokenizer_config.json"),
    )
    .unwrap();
    let mut recipe = pocl::config::Recipe::default();
    recipe.model.student = student.clone();
    recipe.data.train = fixture("data/messages.jsonl");
    recipe.data.dev_size = 0;
    recipe.data.template = "chat".into();
    let tok = pocl::tokenizer::Tokenizer::from_dir(&student, Some(700)).unwrap();
    let splits = pocl::train::splits::Splits::load(&recipe, &tok).unwrap();
    let i = splits.train.iter().position(|e| e.id == 2).unwrap();
    let ex = &splits.train[i];
    assert_eq!(
        tok.decode(&ex.prompt_ids, false).unwrap(),
        chatml_prompt(
            None,
            &[("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?")]
        )
    );
    assert_eq!(
        tok.decode(&ex.response_ids, false).unwrap(),
        "6<|im_end|><|endoftext|>"
    );
    assert_eq!(splits.train_references[i], vec!["6".to_string()]);
}
