//! Reading instruction JSONL: format detection, bad input (one clear error naming file, line and
//! field, or skipped and counted), stable ids and seeded splits.

use pocl::data::{load_jsonl, seeded_split, Format, LoadOptions, Sample};
use std::path::PathBuf;

/// Writes `bytes` to a fresh file under the test target dir.
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("data-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err(path: &std::path::Path, opts: LoadOptions) -> String {
    format!("{:#}", load_jsonl(path, opts).unwrap_err())
}

const DOLLY: &str = r#"{"instruction": "a", "context": "", "response": "b", "category": "c"}"#;

#[test]
fn malformed_json_names_file_and_line() {
    let p = file(
        "malformed.jsonl",
        format!("{DOLLY}\n{{\"instruction\": \"x\",\n").as_bytes(),
    );
    let e = err(&p, LoadOptions::default());
    assert!(
        e.starts_with(&format!("{}:2: malformed JSON", p.display())),
        "{e}"
    );
}

#[test]
fn missing_and_non_string_fields_name_the_field() {
    let p = file(
        "missing.jsonl",
        format!("{DOLLY}\n{DOLLY}\n{{\"instruction\": \"a\", \"response\": 5}}\n").as_bytes(),
    );
    let e = err(&p, LoadOptions::default());
    assert_eq!(
        e,
        format!(
            "{}:3: field \"response\": expected a string, found a number",
            p.display()
        )
    );
    let p = file(
        "missing2.jsonl",
        format!("{DOLLY}\n{{\"response\": \"b\"}}\n").as_bytes(),
    );
    assert_eq!(
        err(&p, LoadOptions::default()),
        format!("{}:2: field \"instruction\": missing", p.display())
    );
    // Optional fields may be null or absent, but not of another type.
    let p = file(
        "ctx.jsonl",
        br#"{"instruction": "a", "context": null, "response": "b"}
{"instruction": "a", "context": ["x"], "response": "b"}
"#,
    );
    assert_eq!(
        err(&p, LoadOptions::default()),
        format!(
            "{}:2: field \"context\": expected a string, found an array",
            p.display()
        )
    );
    // Not an object at all.
    let p = file("array.jsonl", b"[1, 2]\n");
    assert_eq!(
        err(&p, LoadOptions::default()),
        format!("{}:1: expected a JSON object", p.display())
    );
    // Unknown layout.
    let p = file("unknown.jsonl", br#"{"question": "a", "answer": "b"}"#);
    assert!(err(&p, LoadOptions::default()).contains(":1: cannot detect the data format"));
}

#[test]
fn invalid_utf8_names_the_line() {
    let mut bytes = format!("{DOLLY}\n").into_bytes();
    bytes.extend_from_slice(b"{\"instruction\": \"caf\xe9\", \"response\": \"x\"}\n");
    let p = file("latin1.jsonl", &bytes);
    let e = err(&p, LoadOptions::default());
    assert!(
        e.starts_with(&format!("{}:2: invalid UTF-8", p.display())),
        "{e}"
    );
}

#[test]
fn empty_files_are_errors() {
    for (name, bytes) in [("empty.jsonl", &b""[..]), ("blank.jsonl", &b"\n  \n"[..])] {
        let p = file(name, bytes);
        assert_eq!(
            err(&p, LoadOptions::default()),
            format!("{}: the file is empty", p.display())
        );
        assert!(load_jsonl(
            &p,
            LoadOptions {
                skip_bad: true,
                format: None
            }
        )
        .is_err());
    }
}

#[test]
fn skip_bad_records_counts_them_and_keeps_line_ids() {
    // A byte-order mark and Windows line ends are tolerated.
    let mut bytes = "\u{feff}".as_bytes().to_vec();
    bytes.extend_from_slice(
        format!("{DOLLY}\nnot json\n\n{{\"instruction\": 1, \"response\": \"x\"}}\n").as_bytes(),
    );
    bytes.extend_from_slice(b"{\"instruction\": \"\xff\", \"response\": \"x\"}\n");
    bytes.extend_from_slice(format!("{DOLLY}\r\n").as_bytes());
    let p = file("mixed.jsonl", &bytes);
    assert!(err(&p, LoadOptions::default()).contains(":2: malformed JSON"));
    let l = load_jsonl(
        &p,
        LoadOptions {
            skip_bad: true,
            format: None,
        },
    )
    .unwrap();
    assert_eq!(l.samples.iter().map(|s| s.id).collect::<Vec<_>>(), [1, 6]);
    assert_eq!(
        l.skipped.iter().map(|e| e.line).collect::<Vec<_>>(),
        [2, 4, 5]
    );
    let summary = l.skipped_summary().unwrap();
    assert!(
        summary.starts_with("3 bad record(s) skipped (first: ")
            && summary.contains(":2: malformed JSON"),
        "{summary}"
    );
    // Nothing usable at all is still an error.
    let p = file("allbad.jsonl", b"nope\n{}\n");
    assert!(load_jsonl(
        &p,
        LoadOptions {
            skip_bad: true,
            format: None
        }
    )
    .unwrap_err()
    .to_string()
    .contains("no usable record"));
}

#[test]
fn alpaca_processed_and_forced_formats() {
    let p = file(
        "alpaca.jsonl",
        br#"{"instruction": "a", "input": "i", "output": "o"}
{"instruction": "a", "output": "o"}
"#,
    );
    let l = load_jsonl(&p, LoadOptions::default()).unwrap();
    assert_eq!(l.format, Format::Alpaca);
    assert_eq!(
        l.samples[0],
        Sample {
            id: 1,
            input: "i".into(),
            ..Sample::new(1, "a", "i", "o")
        }
    );
    assert_eq!(l.samples[1].input, "");
    // Forcing Dolly on Alpaca data names the missing field.
    let forced = LoadOptions {
        format: Some(Format::Dolly),
        skip_bad: false,
    };
    assert_eq!(
        err(&p, forced),
        format!("{}:1: field \"response\": missing", p.display())
    );

    let p = file(
        "processed.jsonl",
        br#"{"prompt": "P1\n", "output": "o1"}
{"prompt": "P2\n", "instruction": "q", "input": "", "output": ["o2", "alt"]}
{"prompt": "P3\n", "output": ["o3", 4]}
"#,
    );
    let e = err(&p, LoadOptions::default());
    assert_eq!(
        e,
        format!(
            "{}:3: field \"output\"[1]: expected a string, found a number",
            p.display()
        )
    );
    let l = load_jsonl(
        &p,
        LoadOptions {
            skip_bad: true,
            format: None,
        },
    )
    .unwrap();
    assert_eq!(l.format, Format::Processed);
    assert_eq!(l.samples[0].prompt.as_deref(), Some("P1\n"));
    assert_eq!(l.samples[1].references(), ["o2", "alt"]);
    assert_eq!(l.samples[1].instruction, "q");
    assert_eq!(
        "prompt-output".parse::<Format>().unwrap(),
        Format::Processed
    );
    assert!("csv".parse::<Format>().is_err());
}

#[test]
fn seeded_split_is_deterministic_and_disjoint() {
    let samples: Vec<Sample> = (1..=100)
        .map(|i| Sample::new(i, format!("q{i}"), "", "r"))
        .collect();
    let (tr, dv, te) = seeded_split(samples.clone(), 10, 15, 7).unwrap();
    assert_eq!((tr.len(), dv.len(), te.len()), (75, 10, 15));
    let mut all: Vec<u64> = tr.iter().chain(&dv).chain(&te).map(|s| s.id).collect();
    all.sort();
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
    let again = seeded_split(samples.clone(), 10, 15, 7).unwrap();
    assert_eq!(again.1, dv);
    assert_ne!(seeded_split(samples.clone(), 10, 15, 8).unwrap().1, dv);
    assert!(
        dv.windows(2).all(|w| w[0].id < w[1].id),
        "each part keeps file order"
    );
    assert!(seeded_split(samples, 50, 50, 1).is_err());
}

#[test]
fn check_command_reports_errors_and_skips() {
    let p = file(
        "cli.jsonl",
        format!("{DOLLY}\n{{\"instruction\": \"a\", \"response\": 5}}\n{DOLLY}\n").as_bytes(),
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["data", "check", p.to_str().unwrap()];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_pocl"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{}:2: field \"response\": expected a string",
            p.display()
        )),
        "{err}"
    );
    let out = run(&["--skip-bad"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("2 samples, format dolly")
            && text.contains("1 bad record(s) skipped"),
        "{text}"
    );
}
