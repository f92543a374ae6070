//! report.md of `pocl demo`: the results table shaped like POCL.md §6 (rows: teacher, SFT, each
//! method with and without POCL; columns: the test sets and their average; mean ± std over
//! training seeds), POCL's gain per method, and the compute each run took.

use crate::demo::Demo;
use crate::eval::evaluate::EvalReport;
use crate::kd::LossKind;
use anyhow::Result;
use std::fmt::Write;

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n.max(1.0);
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn cell((m, s): (f64, f64)) -> String {
    format!("{m:.2} ± {s:.2}")
}

/// Seconds a finished run spent training (from its last checkpoint's trainer state).
pub fn train_seconds(run_dir: &std::path::Path) -> Option<f64> {
    let p = crate::train::checkpoint::last_checkpoint(run_dir)
        .join(crate::train::checkpoint::STATE_FILE);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["train_seconds"].as_f64()
}

pub fn method_label(m: LossKind) -> String {
    match m {
        LossKind::Sft => "SFT student".into(),
        other => other.name().to_uppercase(),
    }
}

/// Builds report.md from the runs `(name, method, pocl, seed)` and their evaluations.
pub fn demo_report(
    demo: &Demo,
    runs: &[(String, LossKind, bool, u64)],
    results: &[(String, EvalReport)],
    measure_seconds: f64,
) -> Result<String> {
    let p = &demo.plan;
    let get = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, r)| r);
    let set_names: Vec<String> = results[0].1.sets.iter().map(|s| s.name.clone()).collect();
    let mut md = String::new();
    writeln!(
        md,
        "# pocl demo: knowledge distillation with and without POCL\n"
    )?;
    writeln!(
        md,
        "Built-in benchmark ({} training samples, {} per test set), GPT-2-architecture teacher (d={}, {} layers) \
         and student (d={}, {} layers), both pretrained here on the benchmark's raw text; teacher fine-tuned \
         for {} epochs. KD runs start from the base student; POCL: {} stages x {} epochs (T 1 -> 2, KD weight \
         0.7 -> 1.0); plain KD and SFT: {} epochs (about the same number of sample visits). Training seeds {:?}, \
         generation seeds {:?} (sampling at T = 1, no-repeat-ngram 6, up to {} new tokens; plain prompt template).\n",
        p.n_train, p.n_test, p.teacher.0, p.teacher.1, p.student.0, p.student.1, p.teacher_sft_epochs, p.stages,
        p.epochs_per_stage, p.baseline_epochs, p.train_seeds, p.eval_seeds, p.max_new_tokens
    )?;
    writeln!(md, "## ROUGE-L (x100) on the test sets\n")?;
    writeln!(md, "Mean ± std over training seeds (each value the mean over generation seeds); the teacher: over generation seeds.\n")?;
    let header: Vec<String> = set_names
        .iter()
        .cloned()
        .chain(["average".to_string()])
        .collect();
    writeln!(md, "| method | {} |", header.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(header.len()))?;
    if let Some(t) = get("teacher") {
        let mut cells: Vec<String> = t.sets.iter().map(|s| cell((s.mean, s.std))).collect();
        cells.push(cell((t.average.mean, t.average.std)));
        writeln!(md, "| Teacher (SFT) | {} |", cells.join(" | "))?;
    }
    // Per (method, pocl): per-set means over the training seeds.
    let mut rows: Vec<(LossKind, bool)> = Vec::new();
    for &(_, m, pocl, _) in runs {
        if !rows.contains(&(m, pocl)) {
            rows.push((m, pocl));
        }
    }
    let mut averages: Vec<((LossKind, bool), f64)> = Vec::new();
    for (m, pocl) in &rows {
        let reports: Vec<&EvalReport> = runs
            .iter()
            .filter(|(_, rm, rp, _)| rm == m && rp == pocl)
            .filter_map(|(n, ..)| get(n))
            .collect();
        let mut cells = Vec::new();
        for (k, _) in set_names.iter().enumerate() {
            cells.push(cell(mean_std(
                &reports.iter().map(|r| r.sets[k].mean).collect::<Vec<_>>(),
            )));
        }
        let avg = mean_std(&reports.iter().map(|r| r.average.mean).collect::<Vec<_>>());
        averages.push(((*m, *pocl), avg.0));
        cells.push(cell(avg));
        let label = if *pocl {
            format!("{} + POCL", method_label(*m))
        } else {
            method_label(*m)
        };
        writeln!(md, "| {label} | {} |", cells.join(" | "))?;
    }
    writeln!(md, "\n## POCL against plain KD (average ROUGE-L)\n")?;
    writeln!(
        md,
        "| method | without POCL | with POCL | difference |\n|---|---|---|---|"
    )?;
    for &m in &p.methods {
        let find = |pocl: bool| {
            averages
                .iter()
                .find(|((mm, pp), _)| *mm == m && *pp == pocl)
                .map(|(_, a)| *a)
        };
        if let (Some(a), Some(b)) = (find(false), find(true)) {
            writeln!(
                md,
                "| {} | {a:.2} | {b:.2} | {:+.2} |",
                method_label(m),
                b - a
            )?;
        }
    }
    writeln!(md, "\n## Compute\n")?;
    writeln!(md, "| run | training wall time (s) |\n|---|---|")?;
    let mut pocl_times = Vec::new();
    for name in ["pretrain-teacher", "pretrain-student", "teacher-sft"]
        .iter()
        .map(|s| s.to_string())
        .chain(runs.iter().map(|r| r.0.clone()))
    {
        if let Some(s) = train_seconds(&demo.out.join("runs").join(&name)) {
            writeln!(md, "| {name} | {s:.1} |")?;
            if name.contains("-pocl-") {
                pocl_times.push(s);
            }
        }
    }
    if !pocl_times.is_empty() {
        let run = mean_std(&pocl_times).0;
        writeln!(
            md,
            "\nThe difficulty measurer took {measure_seconds:.1} s once (shared by every POCL run): {:.1}% of the \
             wall time of a POCL run (measurer + {run:.1} s of training on average).",
            100.0 * measure_seconds / (measure_seconds + run)
        )?;
    }
    writeln!(md, "\n## Figures\n")?;
    for (caption, path) in demo_plots(demo)? {
        writeln!(md, "{caption}\n\n![{caption}]({path})\n")?;
    }
    Ok(md)
}

fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// (samples seen, value of `key`) for every record of `kind` in a run's metrics; the x axis counts
/// training samples so that runs with different steps per epoch line up.
fn curve(metrics: &[serde_json::Value], kind: &str, key: &str) -> Vec<(f64, f64)> {
    let mut seen = 0.0;
    let mut seen_at_step = std::collections::HashMap::new();
    for r in metrics.iter().filter(|r| r["type"] == "step") {
        seen += r["samples"].as_f64().unwrap_or(0.0);
        seen_at_step.insert(r["step"].as_u64().unwrap_or(0), seen);
    }
    metrics
        .iter()
        .filter(|r| r["type"] == kind)
        .filter_map(|r| Some((*seen_at_step.get(&r["step"].as_u64()?)?, r[key].as_f64()?)))
        .collect()
}

/// Draws the demo's figures into OUT/plots and returns (caption, relative path) for each.
pub fn demo_plots(demo: &Demo) -> Result<Vec<(String, String)>> {
    use super::plot::{histogram_png, line_chart_png, write_png, Histogram, LineChart, Series};
    let dir = demo.out.join("plots");
    crate::create_dir_all(&dir)?;
    let p = &demo.plan;
    let (Some(method), Some(seed)) = (p.methods.first(), p.train_seeds.first()) else {
        return Ok(vec![]);
    };
    let metrics = |run: String| read_jsonl(&crate::train::metrics::path(&demo.out.join(run)));
    let kd = metrics(format!("runs/{method}-s{seed}"));
    let pocl = metrics(format!("runs/{method}-pocl-s{seed}"));
    // Stage boundaries of the POCL run, in samples seen.
    let mut markers = Vec::new();
    let mut seen = 0.0;
    for r in &pocl {
        if r["type"] == "stage" {
            markers.push((
                seen,
                format!("stage {}", r["stage"].as_u64().unwrap_or(0) + 1),
            ));
        } else if r["type"] == "step" {
            seen += r["samples"].as_f64().unwrap_or(0.0);
        }
    }
    let label = method_label(*method);
    let mut out = Vec::new();
    for (file, title, kind, key, y) in [
        (
            "dev_rouge.png",
            "Dev ROUGE-L",
            "eval",
            "dev_rouge",
            "dev ROUGE-L",
        ),
        (
            "kd_loss.png",
            "KD loss per step",
            "step",
            "kd",
            "KD loss (T^2-scaled)",
        ),
    ] {
        let chart = LineChart {
            title: format!("{title}: {label} vs {label} + POCL"),
            x_label: "training samples seen".into(),
            y_label: y.into(),
            series: vec![
                Series {
                    label: label.clone(),
                    points: curve(&kd, kind, key),
                },
                Series {
                    label: format!("{label} + POCL"),
                    points: curve(&pocl, kind, key),
                },
            ],
            markers: markers.clone(),
        };
        write_png(&dir.join(file), &line_chart_png(&chart, 720, 420)?)?;
        out.push((format!("{title} during training, {label} vs {label} + POCL (seed {seed}); dashed lines: POCL stage starts"), format!("plots/{file}")));
    }
    let scores = read_jsonl(&demo.out.join("scores.jsonl"));
    let mut groups: Vec<(String, Vec<f64>)> = (0..p.stages)
        .map(|b| (format!("bucket {}", b + 1), vec![]))
        .collect();
    for s in &scores {
        if let (Some(b), Some(v)) = (s["bucket"].as_u64(), s["rrf"].as_f64()) {
            if let Some(g) = groups.get_mut(b as usize) {
                g.1.push(v);
            }
        }
    }
    let h = Histogram {
        title: "Difficulty (RRF score) per bucket, 1 = easiest".into(),
        x_label: "RRF score (higher = easier)".into(),
        groups,
        bins: 20,
    };
    write_png(&dir.join("difficulty.png"), &histogram_png(&h, 720, 420)?)?;
    out.push((
        "Difficulty scores of the training samples by bucket".into(),
        "plots/difficulty.png".into(),
    ));
    Ok(out)
}
