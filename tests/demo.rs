//! `pocl demo --quick` end to end, as CI runs it: the report has every row with numbers in range,
//! the POCL run went through all its stages, and a second demo in the same directory reuses the
//! finished phases.

use std::path::Path;
use std::process::Command;

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

/// "m ± s" -> (m, s)
fn mean_std(cell: &str) -> (f64, f64) {
    let (m, s) = cell
        .split_once('±')
        .unwrap_or_else(|| panic!("not 'mean ± std': {cell:?}"));
    (m.trim().parse().unwrap(), s.trim().parse().unwrap())
}

fn stage_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["type"] == "stage")
        .collect()
}

#[test]
fn quick_demo_reports_kd_with_and_without_pocl() {
    let out = std::env::temp_dir().join(format!("pocl-demo-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let bin = env!("CARGO_BIN_EXE_pocl");
    let run = Command::new(bin)
        .args(["demo", "--quick", "--out", &out.display().to_string()])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{log}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let table: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.starts_with("| method | test_id"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(
        cells(table[0]),
        ["method", "test_id", "test_long", "test_phrasing", "average"]
    );
    let rows: Vec<Vec<String>> = table[2..].iter().map(|l| cells(l)).collect();
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["Teacher (SFT)", "SFT student", "FKL", "FKL + POCL"]);
    for r in &rows {
        assert_eq!(r.len(), 5, "{r:?}");
        for c in &r[1..] {
            let (m, s) = mean_std(c);
            assert!((0.0..=100.0).contains(&m) && s >= 0.0, "{r:?}");
        }
        // The average column is the mean of the three sets (per seed, then over seeds).
        let sets: f64 = r[1..4].iter().map(|c| mean_std(c).0).sum::<f64>() / 3.0;
        assert!((sets - mean_std(&r[4]).0).abs() < 0.011, "{r:?}");
    }
    assert!(report.contains("## Compute") && report.contains("difficulty measurer took"));

    // The POCL run went through all four stages with the growing data; plain KD had one.
    let pocl = stage_records(&out.join("runs/fkl-pocl-s10"));
    let t: Vec<f64> = pocl
        .iter()
        .map(|r| r["temperature"].as_f64().unwrap())
        .collect();
    let n: Vec<u64> = pocl
        .iter()
        .map(|r| r["active_samples"].as_u64().unwrap())
        .collect();
    assert_eq!(t.len(), 4);
    assert!(
        t.windows(2).all(|w| w[0] < w[1]) && n.windows(2).all(|w| w[0] < w[1]),
        "{t:?} {n:?}"
    );
    assert_eq!(stage_records(&out.join("runs/fkl-s10")).len(), 1);
    for name in ["teacher", "sft-s10", "fkl-s10", "fkl-pocl-s10"] {
        assert!(
            out.join("eval").join(name).join("results.json").is_file(),
            "{name} evaluated"
        );
    }

    // The figures exist, are linked from the report, and are PNGs of the stated size.
    for f in ["dev_rouge.png", "kd_loss.png", "difficulty.png"] {
        let png = std::fs::read(out.join("plots").join(f)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        assert_eq!(&png[12..16], b"IHDR");
        let (w, h) = (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap()),
        );
        assert_eq!((w, h), (720, 420), "{f}");
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        assert!(
            report.contains(&format!("(plots/{f})")),
            "{f} linked from report.md"
        );
    }

    // A second demo in the same directory reuses every finished phase and rewrites the same table.
    let again = Command::new(bin)
        .args(["demo", "--quick", "--out", &out.display().to_string()])
        .output()
        .unwrap();
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        log.contains("teacher-sft: reusing") && !log.contains(": training"),
        "{log}"
    );
    let report2 = std::fs::read_to_string(out.join("report.md")).unwrap();
    let table2: Vec<&str> = report2
        .lines()
        .skip_while(|l| !l.starts_with("| method | test_id"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(table, table2);

    // With --teacher-cache the same directory builds the cache once and trains the off-policy KD
    // runs on it (the live runs above are kept); the report states the time against them.
    let cached = Command::new(bin)
        .args(["demo", "--quick", "--teacher-cache", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&cached.stderr);
    assert!(
        cached.status.success(),
        "demo --teacher-cache failed:\n{log}"
    );
    assert!(out.join("teacher-cache/manifest.json").is_file(), "{log}");
    // The FKL runs read their own cache, with a sampled rest.
    let manifest = std::fs::read_to_string(out.join("teacher-cache-fkl/manifest.json")).unwrap();
    assert!(manifest.contains("\"sampled\": 16"), "{manifest}");
    let pocl = stage_records(&out.join("runs/fkl-pocl-s10-cached"));
    assert_eq!(pocl.len(), 4, "the cached POCL run went through its stages");
    assert_eq!(stage_records(&out.join("runs/fkl-s10-cached")).len(), 1);
    let report3 = std::fs::read_to_string(out.join("report.md")).unwrap();
    let line = report3
        .lines()
        .find(|l| l.contains("Teacher caches (a sampled rest for FKL"))
        .unwrap_or_else(|| panic!("no cache line in the report:\n{report3}"));
    assert!(
        line.contains("read by 2 runs")
            && line.contains("the same runs with the live teacher took")
            && line.contains("Relative error of the FKL cache's loss"),
        "{line}"
    );
    std::fs::remove_dir_all(&out).ok();
}
