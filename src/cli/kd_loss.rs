//! `pocl kd-loss`: evaluates one KD loss and its gradient on logits stored in safetensors files,
//! so users can check their own loss setups against pocl (and we can run conformance checks).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use pocl::kd::{self, Divergence};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Teacher logits: safetensors file with an f32 tensor `logits` [tokens, vocab].
    #[arg(long)]
    pub teacher: PathBuf,
    /// Student logits: safetensors file with an f32 tensor `logits` [tokens, vocab].
    #[arg(long)]
    pub student: PathBuf,
    /// Optional safetensors file with an f32 tensor `mask` of shape (tokens) (1 = counted, 0 = excluded);
    /// all tokens count when omitted.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Divergence: fkl, rkl, jsd, tvd, skl, srkl.
    #[arg(long)]
    pub loss: String,
    /// Temperature T dividing teacher and student logits.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Skew α of skl / srkl (default 0.1).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Weight β of jsd (default 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// Do not multiply the divergence by T² (the default rule multiplies every divergence by T²).
    #[arg(long)]
    pub no_t2: bool,
    /// Write the f32 gradient of the loss w.r.t. the student logits here, as tensor `grad`.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Teacher tokenizer.json: needed only when the vocab sizes differ, to check that the
    /// tokenizers agree on the common prefix.
    #[arg(long)]
    pub teacher_tokenizer: Option<PathBuf>,
    /// Student tokenizer.json (see --teacher-tokenizer).
    #[arg(long)]
    pub student_tokenizer: Option<PathBuf>,
}

/// Prints `{"loss": value}` where the loss is the masked token mean Σ mask·scale·D_T / Σ mask
/// (scale = T², or 1 with --no-t2), and writes its gradient w.r.t. the student logits.
pub fn run(args: Args) -> Result<()> {
    let div = Divergence::parse(&args.loss, args.alpha, args.beta)?;
    let dev = Device::Cpu;
    let (tv, tshape) = read_f32(&args.teacher, "logits")?;
    let (sv, sshape) = read_f32(&args.student, "logits")?;
    let dims2 = |shape: &[usize], path: &Path| -> Result<(usize, usize)> {
        match shape {
            [n, v] => Ok((*n, *v)),
            _ => bail!(
                "{}: tensor 'logits' must be [tokens, vocab], got shape {shape:?}",
                path.display()
            ),
        }
    };
    let (tn, tvocab) = dims2(&tshape, &args.teacher)?;
    let (sn, svocab) = dims2(&sshape, &args.student)?;
    if tn != sn {
        bail!(
            "{} has {tn} tokens but {} has {sn}: tensor 'logits' must have the same number of rows",
            args.teacher.display(),
            args.student.display()
        );
    }
    for (values, vocab, path) in [(&tv, tvocab, &args.teacher), (&sv, svocab, &args.student)] {
        finite_rows(values, vocab, path, "logits")?;
    }
    let mask = match &args.mask {
        Some(p) => {
            let (m, mshape) = read_f32(p, "mask")?;
            if mshape.as_slice() != [tn] {
                bail!(
                    "{}: tensor 'mask' must be [{tn}] (one entry per token), got shape {mshape:?}",
                    p.display()
                );
            }
            finite_rows(&m, 1, p, "mask")?;
            m
        }
        None => vec![1.0; tn],
    };
    let count: f64 = mask.iter().map(|&m| m as f64).sum();
    if count.is_nan() || count <= 0.0 {
        bail!("the mask selects no tokens (its sum is {count})");
    }
    let teacher = Tensor::from_vec(tv, (tn, tvocab), &dev)?;
    let student = Var::from_vec(sv, (sn, svocab), &dev)?;
    let (t_used, s_used) = if tvocab == svocab {
        (teacher, student.as_tensor().clone())
    } else {
        let (Some(ttok), Some(stok)) = (&args.teacher_tokenizer, &args.student_tokenizer) else {
            bail!(
                "teacher vocab {tvocab} != student vocab {svocab}: pass --teacher-tokenizer and \
                 --student-tokenizer so pocl can check that the tokenizers agree on the common prefix"
            );
        };
        let ttok = pocl::tokenizer::Tokenizer::from_file(ttok, None)?;
        let stok = pocl::tokenizer::Tokenizer::from_file(stok, None)?;
        let v = kd::vocab::common_vocab(&ttok, &stok, tvocab, svocab)?;
        (
            kd::vocab::narrow_to_prefix(&teacher, v)?,
            kd::vocab::narrow_to_prefix(student.as_tensor(), v)?,
        )
    };
    let mask_t = Tensor::from_vec(mask, tn, &dev)?;
    let sum = kd::kd_loss_sum(
        &t_used,
        &s_used,
        &mask_t,
        div,
        args.temperature,
        !args.no_t2,
    )?;
    let loss = (sum / count)?;
    let value = loss.to_scalar::<f32>()?;
    if let Some(out) = &args.output {
        let grads = loss.backward()?;
        let g = match grads.get(&student) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; sn * svocab],
        };
        write_grad(out, &g, sn, svocab)?;
    }
    println!("{}", serde_json::json!({ "loss": value }));
    Ok(())
}

/// Refuses a NaN or infinite entry of tensor `name` (rows of `cols` values), naming its row: the
/// loss of such a row would be NaN, or a finite wrong number after masking.
fn finite_rows(values: &[f32], cols: usize, path: &Path, name: &str) -> Result<()> {
    if let Some((row, col, x)) = pocl::finite::first_non_finite(values, cols) {
        bail!(
            "{}: tensor '{name}' row {row} (column {col}) is {x}; logits and masks must be finite",
            path.display()
        );
    }
    Ok(())
}

/// Reads tensor `name` from a safetensors file as f32 (f16 / bf16 / f64 are converted).
fn read_f32(path: &Path, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let view = st.tensor(name).map_err(|_| {
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        anyhow::anyhow!(
            "{}: no tensor named '{name}' (found: {})",
            path.display(),
            names.join(", ")
        )
    })?;
    let d = view.data();
    use safetensors::Dtype;
    let vals: Vec<f32> = match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        dt => bail!(
            "{}: tensor '{name}' has dtype {dt:?}; expected f32",
            path.display()
        ),
    };
    Ok((vals, view.shape().to_vec()))
}

fn write_grad(path: &Path, g: &[f32], n: usize, v: usize) -> Result<()> {
    let bytes: Vec<u8> = g.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, v], &bytes)
        .map_err(|e| anyhow::anyhow!("gradient tensor: {e}"))?;
    let out = safetensors::tensor::serialize([("grad", view)], None)
        .map_err(|e| anyhow::anyhow!("serialising the gradient: {e}"))?;
    pocl::write_atomic(path, &out).with_context(|| format!("writing {}", path.display()))
}
