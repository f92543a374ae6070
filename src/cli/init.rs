//! `pocl init`: a new, randomly initialised model directory (HF layout) for a tokenizer, or
//! (`--from`) a student pruned from a teacher.

use anyhow::{bail, Context, Result};
use clap::Args;
use pocl::model::init::{init, init_from, KeepLayers, Shape};
use std::path::PathBuf;

#[derive(Args)]
pub struct InitArgs {
    /// gpt2, opt, llama, qwen2 or qwen3.
    #[arg(long, default_value = "gpt2")]
    pub family: String,
    /// Directory holding the tokenizer.json the model is for (not with --from).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub tokenizer: Option<PathBuf>,
    /// Teacher model to prune: the student keeps its embeddings, final norm, lm head and the
    /// layers chosen by --keep-layers or --layers.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// With --from: keep N evenly spaced layers, the first and the last included.
    #[arg(long, requires = "from", conflicts_with = "layers")]
    pub keep_layers: Option<usize>,
    /// New model directory (refused if it exists and is not empty, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace what is at --out.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// The number of layers (default 4); with --from, the teacher layers to keep, as 0,4,8.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads (Llama family); default = heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width (default: the family's usual multiple of hidden).
    #[arg(long, default_value_t = 0)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 512)]
    pub max_positions: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: InitArgs) -> Result<()> {
    pocl::output::check_new_dir("--out", &a.out, a.force)?;
    if let Some(teacher) = &a.from {
        let keep = match (a.keep_layers, &a.layers) {
            (Some(n), _) => KeepLayers::Count(n),
            (None, Some(list)) => KeepLayers::Indices(
                list.split(',')
                    .map(|x| x.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .with_context(|| {
                        format!("--layers {list:?}: expected layer indices like 0,4,8")
                    })?,
            ),
            (None, None) => bail!("--from needs --keep-layers N or --layers 0,4,8"),
        };
        pocl::output::refuse_input_as_output("--out", &a.out, &[("--from", teacher)])?;
        let (kept, n) = init_from(teacher, &keep, &a.out)?;
        eprintln!(
            "wrote {} (teacher layers {kept:?}, {n} parameters)",
            a.out.display()
        );
        return Ok(());
    }
    let tokenizer = a
        .tokenizer
        .clone()
        .expect("clap requires --tokenizer without --from");
    pocl::output::refuse_input_as_output("--out", &a.out, &[("--tokenizer", &tokenizer)])?;
    let layers = match &a.layers {
        None => 4,
        Some(s) => s
            .parse()
            .with_context(|| format!("--layers {s:?}: expected a number of layers"))?,
    };
    let shape = Shape {
        hidden: a.hidden,
        layers,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        intermediate: a.intermediate,
        max_positions: a.max_positions,
    };
    let m = init(&a.family, &shape, &tokenizer, &a.out, a.seed)?;
    eprintln!(
        "wrote {} ({} parameters)",
        a.out.display(),
        m.params().num_elements()
    );
    Ok(())
}
