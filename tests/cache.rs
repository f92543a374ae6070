//! The teacher cache (issue 15): the sparse (top-K + rest) divergences against the dense kernel.

use pocl::kd::divergence::{divergence_row, RowScratch};
use pocl::kd::sparse::{sample_rest, sparse_divergence_row, teacher_buckets, Samples, SparseRow};
use pocl::kd::Divergence;

fn rnd(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn all_divergences() -> Vec<Divergence> {
    ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
        .iter()
        .map(|n| Divergence::parse(n, None, None).unwrap())
        .collect()
}

/// (D, gradient dD/db) of the sparse teacher made from `t` with `k` tokens, at temperature T.
fn sparse(div: Divergence, t: &[f32], s: &[f32], k: usize, temp: f64) -> (f64, Vec<f32>) {
    let (ids, lps) = teacher_buckets(t, k, &[temp]);
    let mut g = vec![0f32; s.len()];
    let row = SparseRow {
        ids: &ids,
        log_p: &lps[0],
        samples: Samples::default(),
    };
    let mut sc = RowScratch::new(s.len());
    let d = sparse_divergence_row(div, row, s, 1.0 / temp, &mut sc, Some((&mut g, 1.0))).unwrap();
    (d, g)
}

fn dense(div: Divergence, t: &[f32], s: &[f32], temp: f64) -> (f64, Vec<f32>) {
    let mut g = vec![0f32; s.len()];
    let mut sc = RowScratch::new(s.len());
    let d = divergence_row(div, t, s, 1.0 / temp, &mut sc, Some((&mut g, 1.0))).unwrap();
    (d, g)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn sparse_equals_the_full_vocabulary_kernel_when_k_is_the_vocabulary() {
    let v = 50;
    for (seed, div) in all_divergences().into_iter().enumerate() {
        for temp in [1.0, 1.5, 2.0] {
            let (t, s) = (rnd(seed as u64, v, 8.0), rnd(100 + seed as u64, v, 8.0));
            let (ds, gs) = sparse(div, &t, &s, v, temp);
            let (dd, gd) = dense(div, &t, &s, temp);
            assert!(
                (ds - dd).abs() <= 1e-10 * dd.abs().max(1e-12),
                "{div} T={temp}: sparse {ds} vs dense {dd}"
            );
            let err = max_diff(&gs, &gd);
            assert!(
                err <= 1e-6 * max_abs(&gd),
                "{div} T={temp}: gradient differs by {err} (top {})",
                max_abs(&gd)
            );
        }
    }
}

/// p̂ and q̂: the distributions conditioned on the rest (tokens outside the teacher's top K), and
/// the two rest masses.
fn rest_parts(t: &[f32], s: &[f32], k: usize, temp: f64) -> (Vec<f64>, Vec<f64>, f64, f64) {
    let soft = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().fold(f64::MIN, |m, &v| m.max(v as f64 / temp));
        let e: Vec<f64> = x.iter().map(|&v| (v as f64 / temp - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    let (p, q) = (soft(t), soft(s));
    let (ids, _) = teacher_buckets(t, k, &[temp]);
    let rest: Vec<usize> = (0..t.len())
        .filter(|j| !ids.contains(&(*j as u32)))
        .collect();
    let (pr, qr): (f64, f64) = (
        rest.iter().map(|&j| p[j]).sum(),
        rest.iter().map(|&j| q[j]).sum(),
    );
    (
        rest.iter().map(|&j| p[j] / pr).collect(),
        rest.iter().map(|&j| q[j] / qr).collect(),
        pr,
        qr,
    )
}

fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| if *x > 0.0 { x * (x / y).ln() } else { 0.0 })
        .sum()
}

#[test]
fn sparse_error_for_k_below_the_vocabulary_stays_within_its_bound() {
    let v = 60;
    for (seed, div) in all_divergences().into_iter().enumerate() {
        for temp in [1.0, 2.0] {
            for k in [1, 5, 20, 59] {
                let (t, s) = (rnd(7 + seed as u64, v, 6.0), rnd(70 + seed as u64, v, 6.0));
                let (ds, _) = sparse(div, &t, &s, k, temp);
                let (dd, _) = dense(div, &t, &s, temp);
                let gap = dd - ds;
                let (ph, qh, pr, qr) = rest_parts(&t, &s, k, temp);
                let tol = 1e-10 * dd.abs().max(1.0);
                // Merging outcomes never increases an f-divergence.
                assert!(
                    gap >= -tol,
                    "{div} T={temp} K={k}: sparse {ds} > dense {dd}"
                );
                let what = format!("{div} T={temp} K={k}: gap {gap}");
                match div {
                    // Chain rule: the gap is the rest's mass times the divergence inside it.
                    Divergence::Fkl => assert!((gap - pr * kl(&ph, &qh)).abs() <= tol, "{what}"),
                    Divergence::Rkl => assert!((gap - qr * kl(&qh, &ph)).abs() <= tol, "{what}"),
                    Divergence::Tvd => assert!(gap <= pr.min(qr) + tol, "{what}"),
                    Divergence::Jsd { beta } => {
                        let w = beta.min(1.0 - beta);
                        assert!(gap <= (pr + qr) * (1.0 + (1.0 / w).ln()) + tol, "{what}")
                    }
                    Divergence::Skl { alpha } | Divergence::Srkl { alpha } => {
                        assert!(
                            gap <= (pr + qr) * (1.0 + (1.0 / alpha).ln()) + tol,
                            "{what}"
                        )
                    }
                }
            }
        }
    }
}

#[test]
fn sparse_gradient_matches_finite_differences() {
    let (v, k, temp) = (30, 6, 1.5);
    for (seed, div) in all_divergences().into_iter().enumerate() {
        if div == Divergence::Tvd {
            continue; // piecewise linear: covered against the dense kernel at K = V
        }
        let t = rnd(3 + seed as u64, v, 5.0);
        // Logits on a 1/1024 grid, so that ±h below is exact in f32.
        let s: Vec<f32> = rnd(30 + seed as u64, v, 5.0)
            .iter()
            .map(|x| (x * 1024.0).round() / 1024.0)
            .collect();
        let (_, g) = sparse(div, &t, &s, k, temp);
        let h = 1.0 / 256.0;
        let mut fd = vec![0f32; v];
        for j in 0..v {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[j] += h;
            b[j] -= h;
            // dD/ds = dD/db / T, and the kernel returns dD/db.
            let d = (sparse(div, &t, &a, k, temp).0 - sparse(div, &t, &b, k, temp).0)
                / (2.0 * h as f64);
            fd[j] = (d * temp) as f32;
        }
        let err = max_diff(&g, &fd);
        assert!(
            err <= 1e-3 * max_abs(&fd),
            "{div}: gradient vs finite differences {err} (top {})",
            max_abs(&fd)
        );
    }
}

/// (D, dD/db) of forward KL with the top `k - m` tokens of `t` and `m` samples of its rest
/// drawn at temperature `hot` with stream `seed`; the importance weights are computed here from
/// the exact logits (log p_T − log M − log π, π the rest distribution at `hot`).
fn sampled(
    t: &[f32],
    s: &[f32],
    k: usize,
    m: usize,
    temp: f64,
    hot: f64,
    seed: u64,
) -> (f64, Vec<f32>) {
    let (ids, lps) = teacher_buckets(t, k - m, &[temp, hot]);
    let draws = sample_rest(t, &ids, hot, m, seed);
    let log_z = |x: f64| {
        let v: Vec<f64> = t.iter().map(|&z| z as f64 / x).collect();
        let hi = v.iter().cloned().fold(f64::MIN, f64::max);
        hi + v.iter().map(|y| (y - hi).exp()).sum::<f64>().ln()
    };
    let (zt, zh) = (log_z(temp), log_z(hot));
    let log_rest_hot = lps[1][k - m];
    let lp: Vec<f64> = draws
        .iter()
        .map(|&j| t[j as usize] as f64 / temp - zt)
        .collect();
    let lw: Vec<f64> = draws
        .iter()
        .zip(&lp)
        .map(|(&j, lp)| lp - (m as f64).ln() - (t[j as usize] as f64 / hot - zh - log_rest_hot))
        .collect();
    let row = SparseRow {
        ids: &ids,
        log_p: &lps[0],
        samples: Samples {
            ids: &draws,
            log_p: &lp,
            log_w: &lw,
        },
    };
    let mut g = vec![0f32; s.len()];
    let mut sc = RowScratch::new(s.len());
    let d = sparse_divergence_row(
        Divergence::Fkl,
        row,
        s,
        1.0 / temp,
        &mut sc,
        Some((&mut g, 1.0)),
    )
    .unwrap();
    (d, g)
}

#[test]
fn a_sampled_rest_estimates_forward_kl_without_bias() {
    let (v, k, m) = (200, 12, 6);
    let fkl = Divergence::Fkl;
    for (case, temp) in [1.0, 1.5, 2.0].into_iter().enumerate() {
        let t = rnd(7 + case as u64, v, 6.0);
        let s = rnd(70 + case as u64, v, 6.0);
        let (full, g_full) = dense(fkl, &t, &s, temp);
        let (bucket, _) = sparse(fkl, &t, &s, k, temp);
        // The mean over many draws (proposal at T = 2) against the full value and gradient.
        let n = 4000;
        let (mut sum, mut sum2) = (0.0, 0.0);
        let (mut g_sum, mut g_sum2) = (vec![0f64; v], vec![0f64; v]);
        for seed in 0..n {
            let (d, g) = sampled(&t, &s, k, m, temp, 2.0, seed);
            sum += d;
            sum2 += d * d;
            for j in 0..v {
                g_sum[j] += g[j] as f64;
                g_sum2[j] += (g[j] as f64).powi(2);
            }
        }
        let mean = sum / n as f64;
        let se = ((sum2 / n as f64 - mean * mean) / n as f64).sqrt();
        assert!(
            (mean - full).abs() <= 4.0 * se + 1e-9,
            "T = {temp}: sampled mean {mean} ± {se} vs full {full} (bucket {bucket})"
        );
        // Closer than the bucket, which is biased low by the rest's inner divergence.
        assert!((mean - full).abs() < 0.2 * (full - bucket), "T = {temp}");
        // Every component of the mean gradient within 5 standard errors of the full one.
        for j in 0..v {
            let gm = g_sum[j] / n as f64;
            let gse = ((g_sum2[j] / n as f64 - gm * gm).max(0.0) / n as f64).sqrt();
            assert!(
                (gm - g_full[j] as f64).abs() <= 5.0 * gse + 1e-6,
                "T = {temp}, token {j}: mean gradient {gm} ± {gse} vs full {}",
                g_full[j]
            );
        }
    }
}

#[test]
fn the_sampled_rest_gradient_matches_finite_differences() {
    let (v, k, m, temp) = (30, 8, 4, 1.5);
    let t = rnd(5, v, 5.0);
    let s: Vec<f32> = rnd(50, v, 5.0)
        .iter()
        .map(|x| (x * 1024.0).round() / 1024.0)
        .collect();
    let (_, g) = sampled(&t, &s, k, m, temp, 2.0, 11);
    let h = 1.0 / 256.0;
    let fd: Vec<f32> = (0..v)
        .map(|j| {
            let (mut a, mut b) = (s.clone(), s.clone());
            a[j] += h;
            b[j] -= h;
            let d = (sampled(&t, &a, k, m, temp, 2.0, 11).0
                - sampled(&t, &b, k, m, temp, 2.0, 11).0)
                / (2.0 * h as f64);
            (d * temp) as f32
        })
        .collect();
    let err = max_diff(&g, &fd);
    assert!(err <= 1e-3 * max_abs(&fd), "{err} (top {})", max_abs(&fd));
}

// ---- The cache on disk and in training, with tiny models on the built-in benchmark ----

use pocl::cache::{
    build_for_recipe, recipe_identity, LiveSparse, Slots, SparseTeacher, TeacherCache,
};
use pocl::config::Recipe;
use pocl::data::synthetic::SynthConfig;
use pocl::model::init::{init, Shape};
use std::path::{Path, PathBuf};

struct Setup {
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A small benchmark, a teacher and a student (random GPT-2s), and a recipe using a cache.
fn setup(tag: &str, n_train: usize) -> (Setup, Recipe) {
    let dir = std::env::temp_dir().join(format!("pocl-cache-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let cfg = SynthConfig {
        n_train,
        n_dev: 8,
        n_test: 8,
        vocab_size: 300,
        ..SynthConfig::default()
    };
    pocl::data::synthetic::write_benchmark(&dir.join("data"), &cfg).unwrap();
    let shape = |hidden, layers| Shape {
        hidden,
        layers,
        heads: 2,
        kv_heads: 2,
        intermediate: 0,
        max_positions: 128,
    };
    init(
        "gpt2",
        &shape(32, 2),
        &dir.join("data"),
        &dir.join("teacher"),
        1,
    )
    .unwrap();
    init(
        "gpt2",
        &shape(16, 1),
        &dir.join("data"),
        &dir.join("student"),
        2,
    )
    .unwrap();
    let text = r#"seed = 3
[model]
teacher = "teacher"
student = "student"
teacher_cache = "cache"
[data]
train = "data/train.jsonl"
dev = "data/dev.jsonl"
max_prompt_len = 64
max_len = 96
[curriculum]
kind = "temperature-only"
stages = 2
epochs_per_stage = 1
t_start = 2.0
[optim]
lr = 3e-3
batch_size = 8
micro_batch_size = 1
[eval]
dev_rouge_samples = 0
"#;
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    let r = Recipe::load(&p, &[]).unwrap();
    (Setup { dir }, r)
}

fn vocab(r: &Recipe) -> usize {
    pocl::pipeline::kd_vocab_of_dirs(r.model.teacher.as_ref().unwrap(), &r.model.student).unwrap()
}

fn build(r: &Recipe, dir: &Path, k: usize, per_shard: usize) {
    let be = pocl::backend::Backend::cpu();
    let slots = Slots {
        top_k: k,
        sampled: 0,
        temperatures: None,
    };
    build_for_recipe(r, dir, vocab(r), slots, per_shard, &be).unwrap();
}

fn open_err(r: &Recipe, dir: &Path) -> String {
    match TeacherCache::open(dir, &recipe_identity(r, vocab(r), 0).unwrap()) {
        Ok(_) => panic!("the cache in {} was accepted", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn cached_steps_equal_steps_on_the_same_sparse_targets_computed_live() {
    use pocl::kd::{Mix, Objective};
    use pocl::train::optim::{AdamW, AdamWConfig};
    use pocl::train::step::{collate_micro_batches, optimizer_step, Models};
    let (s, r) = setup("steps", 24);
    let cache_dir = s.dir.join("cache");
    build(&r, &cache_dir, 16, 10);
    let be = pocl::backend::Backend::cpu();
    let v = vocab(&r);
    let cache = TeacherCache::open(&cache_dir, &recipe_identity(&r, v, 0).unwrap()).unwrap();
    // K = 16 and one temperature (both stages at T = 2), ids in two bytes: 16·2 + 16·2 + 8.
    assert_eq!(cache.record_bytes(), 16 * 4 + 8);
    let teacher = pocl::model::load_frozen(r.model.teacher.as_ref().unwrap(), &be).unwrap();
    let live = LiveSparse {
        teacher: teacher.as_ref(),
        vocab: v,
        top_k: 16,
        sampled: 0,
        hottest: 2.0,
    };
    let tok = pocl::tokenizer::Tokenizer::from_dir(&r.model.student, None).unwrap();
    let samples = pocl::data::load_jsonl(&r.data.train, Default::default())
        .unwrap()
        .samples;
    let opts = pocl::data::EncodeOptions {
        max_prompt_len: 64,
        max_len: 96,
        ..Default::default()
    };
    let ex = pocl::data::encode_samples(&tok, &samples, &opts)
        .unwrap()
        .examples;
    let run = |src: &dyn SparseTeacher, div: &str| -> Vec<(f64, f64)> {
        let student = pocl::model::load(&r.model.student, &be).unwrap();
        let obj = Objective::new(Divergence::parse(div, None, None).unwrap());
        let mut opt =
            AdamW::new(student.params().iter(), AdamWConfig::default(), obj.kernels).unwrap();
        let models = Models {
            student: student.as_ref(),
            teacher: None,
            sparse_teacher: Some(src),
            objective: obj,
            kd_vocab: v,
        };
        [(2.0, 0.7), (2.0, 1.0), (2.0, 0.9)]
            .iter()
            .enumerate()
            .map(|(i, &(temperature, kd_weight))| {
                let micro =
                    collate_micro_batches(&ex[i * 6..(i + 1) * 6], 1, 0, &be.device).unwrap();
                let mix = Mix {
                    temperature,
                    kd_weight,
                };
                let o =
                    optimizer_step(&models, &mut opt, &micro, mix, 1e-3, 1.0, &mut |_| {}).unwrap();
                (o.loss, o.kd)
            })
            .collect()
    };
    let (a, b) = (run(&cache, "srkl"), run(&live, "srkl"));
    assert!(a.iter().all(|(l, kd)| l.is_finite() && *kd > 0.0), "{a:?}");
    assert_eq!(a, b, "cached vs live sparse step losses");
    // A sampled rest (6 of the 16 slots): the cache's draws and weights are the live ones.
    let sampled_dir = s.dir.join("cache-sampled");
    let slots = Slots {
        top_k: 16,
        sampled: 6,
        temperatures: None,
    };
    build_for_recipe(&r, &sampled_dir, v, slots, 10, &be).unwrap();
    let sampled = TeacherCache::open(&sampled_dir, &recipe_identity(&r, v, 0).unwrap()).unwrap();
    assert_eq!(
        sampled.record_bytes(),
        16 * 4 + 8,
        "the same bytes per token"
    );
    let live_sampled = LiveSparse { sampled: 6, ..live };
    let c = run(&sampled, "fkl");
    // (An estimate: a batch's can fall below 0 where the divergence is small.)
    assert!(c.iter().all(|(l, kd)| l.is_finite() && *kd != 0.0), "{c:?}");
    assert_eq!(c, run(&live_sampled, "fkl"), "cached vs live, sampled rest");
    assert_ne!(c, run(&cache, "fkl"), "the samples are used");
    // A temperature the cache does not hold is refused, naming the cached ones.
    let micro = collate_micro_batches(&ex[..2], 1, 0, &be.device).unwrap();
    let e = cache.targets(&micro[0], 1.5).unwrap_err().to_string();
    assert!(e.contains("temperature 1.5 is not cached"), "{e}");
}

#[test]
fn a_run_with_a_cache_builds_it_once_and_reuses_it() {
    let (s, r) = setup("run", 16);
    let out = s.dir.join("run");
    pocl::pipeline::run_recipe(r.clone(), &out, false).unwrap();
    assert!(
        s.dir.join("cache/manifest.json").is_file(),
        "built before training"
    );
    let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let kd: Vec<f64> = m
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|x| x["type"] == "step")
        .map(|x| x["kd"].as_f64().unwrap())
        .collect();
    // (A forward-KL cache samples its rest by default: an estimate, which can fall below 0.)
    assert!(
        !kd.is_empty() && kd.iter().all(|k| k.is_finite() && *k != 0.0),
        "{kd:?}"
    );
    // A second run reuses the cache as it is.
    let shard = s.dir.join("cache/shard-00000.bin");
    let modified = std::fs::metadata(&shard).unwrap().modified().unwrap();
    pocl::pipeline::run_recipe(r.clone(), &s.dir.join("run2"), false).unwrap();
    assert_eq!(
        modified,
        std::fs::metadata(&shard).unwrap().modified().unwrap()
    );
    // The teacher's weights are part of the cache's identity.
    std::fs::remove_file(s.dir.join("teacher/model.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        pocl::pipeline::run_recipe(r.clone(), &s.dir.join("run3"), false).unwrap_err()
    );
    assert!(e.contains("teacher differs"), "{e}");
}

#[test]
fn a_stale_or_mismatched_cache_is_refused_naming_the_field() {
    let (s, r) = setup("stale", 16);
    let dir = s.dir.join("cache");
    build(&r, &dir, 8, 100);
    assert!(TeacherCache::open(&dir, &recipe_identity(&r, vocab(&r), 0).unwrap()).is_ok());
    let mut r2 = r.clone();
    r2.data.max_len = 80;
    assert!(
        open_err(&r2, &dir).contains("template differs"),
        "{}",
        open_err(&r2, &dir)
    );
    let mut r3 = r.clone();
    r3.curriculum.t_start = 1.5;
    assert!(
        open_err(&r3, &dir).contains("temperatures differs"),
        "{}",
        open_err(&r3, &dir)
    );
    let mut r4 = r.clone();
    r4.model.teacher = Some(s.dir.join("student"));
    assert!(
        open_err(&r4, &dir).contains("teacher differs"),
        "{}",
        open_err(&r4, &dir)
    );
    // The data file changed after the cache was built.
    let data = std::fs::read_to_string(&r.data.train).unwrap();
    let first = data.lines().next().unwrap().to_string();
    std::fs::write(&r.data.train, format!("{data}{first}\n")).unwrap();
    assert!(
        open_err(&r, &dir).contains("data differs"),
        "{}",
        open_err(&r, &dir)
    );
    // Building over a cache of something else is refused too, and leaves it as it was.
    let before = std::fs::read(dir.join("manifest.json")).unwrap();
    let e = format!(
        "{:#}",
        build_for_recipe(
            &r2,
            &dir,
            vocab(&r2),
            Slots {
                top_k: 8,
                sampled: 0,
                temperatures: None,
            },
            100,
            &pocl::backend::Backend::cpu()
        )
        .unwrap_err()
    );
    assert!(e.contains("data differs"), "{e}");
    assert_eq!(before, std::fs::read(dir.join("manifest.json")).unwrap());
}

#[test]
fn a_corrupted_shard_or_manifest_is_detected() {
    let (s, r) = setup("corrupt", 16);
    let dir = s.dir.join("cache");
    build(&r, &dir, 8, 100);
    let shard = dir.join("shard-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let e = open_err(&r, &dir);
    assert!(e.contains("shard-00000.bin: corrupted shard"), "{e}");
    std::fs::write(dir.join("manifest.json"), "{\"format\": 1").unwrap();
    let e = open_err(&r, &dir);
    assert!(
        e.contains("manifest.json: not a teacher-cache manifest"),
        "{e}"
    );
}

#[test]
fn a_killed_build_resumes_to_the_same_cache() {
    let (s, r) = setup("kill", 160);
    let whole = s.dir.join("whole");
    // With a sampled rest: the draws of a resumed build are those of an uninterrupted one.
    let slots = Slots {
        top_k: 8,
        sampled: 3,
        temperatures: None,
    };
    let be = pocl::backend::Backend::cpu();
    build_for_recipe(&r, &whole, vocab(&r), slots, 4, &be).unwrap();
    let dir = s.dir.join("cache");
    // The same build as `whole`, through the command.
    let cache_teacher = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pocl"));
        c.args(["cache-teacher", "--config"])
            .arg(s.dir.join("recipe.toml"))
            .args(["--top-k", "8", "--sampled-rest", "3"])
            .args(["--examples-per-shard", "4"]);
        c
    };
    let mut child = cache_teacher()
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let manifest = dir.join("manifest.json");
    let started = std::time::Instant::now();
    loop {
        let shards = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map_or(0, |m| m["shards"].as_array().unwrap().len());
        if shards >= 2 {
            break;
        }
        assert!(started.elapsed().as_secs() < 120, "no shard written");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // What a kill inside a write leaves (a temporary of the dead process): removed on resume.
    let debris = dir.join(format!(".shard-00009.bin.tmp{}", child.id()));
    std::fs::write(&debris, b"half a shard").unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["complete"], false, "killed before the end");
    let e = open_err(&r, &dir);
    assert!(e.contains("the cache is incomplete"), "{e}");
    let status = cache_teacher().status().unwrap();
    assert!(status.success());
    let files = |d: &Path| {
        let mut f: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        f.sort();
        f
    };
    assert_eq!(
        files(&dir),
        files(&whole),
        "the resumed cache equals an uninterrupted one"
    );
}

/// The step metrics lines of `r` run into `out` (`pipeline::run_recipe`).
fn steps(r: &Recipe, out: &Path) -> Vec<serde_json::Value> {
    pocl::pipeline::run_recipe(r.clone(), out, false).unwrap();
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|x| x["type"] == "step")
        .collect()
}

/// The step losses of `r` run into `out`, with a step flag (`"on_policy"`, `"cached"`).
fn steps_with(r: &Recipe, out: &Path, flag: &str) -> Vec<(f64, bool)> {
    (steps(r, out).iter())
        .map(|x| (x["loss"].as_f64().unwrap(), x[flag].as_bool().unwrap()))
        .collect()
}

/// The step losses of `r` run into `out`, with whether each step was on-policy.
fn step_losses(r: &Recipe, out: &Path) -> Vec<(f64, bool)> {
    steps_with(r, out, "on_policy")
}

#[test]
fn gkd_on_a_cache_reads_it_for_data_batches_and_asks_the_live_teacher_for_samples() {
    let (s, _) = setup("gkd", 16);
    let with = |kv: &[&str]| {
        let kv: Vec<String> = kv.iter().map(|s| s.to_string()).collect();
        Recipe::load(&s.dir.join("recipe.toml"), &kv).unwrap()
    };
    // Every batch on-policy: the cache is never read, the run equals one without a cache.
    let all = with(&["objective.loss=gkd", "gkd.lambda=1", "gkd.max_new_tokens=8"]);
    let mut live = all.clone();
    live.model.teacher_cache = None;
    let a = step_losses(&all, &s.dir.join("all-on-policy"));
    assert!(a.iter().all(|x| x.1) && a.len() >= 2, "{a:?}");
    assert_eq!(a, step_losses(&live, &s.dir.join("all-on-policy-live")));
    // No batch on-policy: GKD is JSD on the data, read from the cache like a jsd run.
    let none = step_losses(
        &with(&["objective.loss=gkd", "gkd.lambda=0"]),
        &s.dir.join("off-policy"),
    );
    let jsd = step_losses(&with(&["objective.loss=jsd"]), &s.dir.join("jsd"));
    assert!(none.iter().all(|x| !x.1));
    assert_eq!(none, jsd);
    // And the cached data batches differ from the live teacher's full rows (K = 64 < vocab).
    let mut jsd_live = with(&["objective.loss=jsd"]);
    jsd_live.model.teacher_cache = None;
    assert_ne!(jsd, step_losses(&jsd_live, &s.dir.join("jsd-live")));
    // Mixed: both kinds of batch in one run.
    let mixed = step_losses(
        &with(&[
            "objective.loss=gkd",
            "gkd.lambda=0.5",
            "gkd.max_new_tokens=8",
        ]),
        &s.dir.join("mixed"),
    );
    assert!(
        mixed.iter().any(|x| x.1) && mixed.iter().any(|x| !x.1),
        "{mixed:?}"
    );
    assert!(mixed.iter().all(|x| x.0.is_finite()));
}

/// The step losses of `r` run into `out`, with whether each step read the cache.
fn cached_steps(r: &Recipe, out: &Path) -> Vec<(f64, bool)> {
    steps_with(r, out, "cached")
}

#[test]
fn a_recipe_cache_measures_its_own_fidelity() {
    let (s, r) = setup("fidelity", 16);
    let mut r = r;
    r.curriculum.t_start = 1.0; // stages at T = 1 and 2
    let v = vocab(&r);
    let open = |dir: &Path| TeacherCache::open(dir, &recipe_identity(&r, v, 0).unwrap()).unwrap();
    // K = vocabulary: the cached loss is the full one up to the f16 logits.
    let full = s.dir.join("cache-full");
    build(&r, &full, v, 8);
    let c = open(&full);
    let f = c.fidelity().expect("measured when built");
    assert_eq!(f.samples, 16);
    assert_eq!(f.relative_error.len(), 6, "{:?}", f.relative_error);
    for (d, errs) in &f.relative_error {
        assert_eq!(errs.len(), 2);
        assert!(errs.iter().all(|e| *e < 1e-4), "{d}: {errs:?}");
    }
    // K = 4 of 300: far off, more so at the higher temperature for the forward divergence.
    let small = s.dir.join("cache-4");
    build(&r, &small, 4, 8);
    let c = open(&small);
    let (e1, e2) = (
        c.fidelity_at("fkl", 1.0).unwrap(),
        c.fidelity_at("fkl", 2.0).unwrap(),
    );
    assert!(e1 > 1e-3 && e2 > e1, "fkl: {e1} at T = 1, {e2} at T = 2");
    assert!(
        c.fidelity_at("fkl", 1.5).is_none(),
        "not a cached temperature"
    );
    // The same 16 slots with 8 drawn from the rest: forward KL closer at both T (here 18%
    // against 81% at T = 2: a near-uniform random teacher and few rows, so a noisy estimate).
    let (bucket, with_samples) = (s.dir.join("cache-16"), s.dir.join("cache-16-8"));
    build(&r, &bucket, 16, 8);
    let slots = Slots {
        top_k: 16,
        sampled: 8,
        temperatures: None,
    };
    let be = pocl::backend::Backend::cpu();
    build_for_recipe(&r, &with_samples, v, slots, 8, &be).unwrap();
    let (b, w) = (open(&bucket), open(&with_samples));
    for t in [1.0, 2.0] {
        let (eb, ew) = (
            b.fidelity_at("fkl", t).unwrap(),
            w.fidelity_at("fkl", t).unwrap(),
        );
        assert!(
            ew < 0.5 * eb,
            "T = {t}: fkl {ew} with a sampled rest, {eb} without"
        );
    }
}

#[test]
fn stages_past_the_max_error_ask_the_live_teacher() {
    let (s, r) = setup("max-error", 16);
    let mut r = r;
    r.curriculum.t_start = 1.0; // stages at T = 1 and 2
    let v = vocab(&r);
    let cache_dir = r.model.teacher_cache.clone().unwrap();
    build(&r, &cache_dir, 4, 8);
    let c = TeacherCache::open(&cache_dir, &recipe_identity(&r, v, 0).unwrap()).unwrap();
    let (e1, e2) = (
        c.fidelity_at("fkl", 1.0).unwrap(),
        c.fidelity_at("fkl", 2.0).unwrap(),
    );
    assert!(e1 < e2, "{e1} {e2}");
    let with_max = |m: Option<f64>| {
        let mut r = r.clone();
        r.model.teacher_cache_max_error = m;
        r
    };
    // Unset: every step reads the cache.
    let cached = cached_steps(&with_max(None), &s.dir.join("cached"));
    assert!(
        cached.len() >= 2 && cached.iter().all(|x| x.1),
        "{cached:?}"
    );
    // Looser than both errors: the same run.
    assert_eq!(
        cached,
        cached_steps(&with_max(Some(1e9)), &s.dir.join("loose"))
    );
    // Stricter than both: every step asks the live teacher, as a run without a cache does.
    let live = cached_steps(&with_max(Some(0.0)), &s.dir.join("strict"));
    assert!(live.iter().all(|x| !x.1), "{live:?}");
    let mut no_cache = r.clone();
    no_cache.model.teacher_cache = None;
    let reference = cached_steps(&no_cache, &s.dir.join("no-cache"));
    assert_eq!(
        live.iter().map(|x| x.0).collect::<Vec<_>>(),
        reference.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    // Between the two: the T = 1 stage reads the cache, the T = 2 stage asks the teacher.
    let mixed = cached_steps(&with_max(Some((e1 + e2) / 2.0)), &s.dir.join("mixed"));
    assert_eq!(mixed.len(), cached.len());
    let half = mixed.len() / 2;
    assert!(mixed[..half].iter().all(|x| x.1), "{mixed:?}");
    assert!(mixed[half..].iter().all(|x| !x.1), "{mixed:?}");
    assert_eq!(mixed[..half], cached[..half], "the cached stage as before");
    // A bad value is refused naming the key.
    let e = Recipe::load(
        &s.dir.join("recipe.toml"),
        &["model.teacher_cache_max_error=-1".into()],
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("model.teacher_cache_max_error"),
        "{e:#}"
    );
}
