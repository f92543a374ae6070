//! Training: the trainer's setup and loop ([`trainer`]), one optimiser step ([`step`]), dev
//! evaluation ([`dev`]), metrics.jsonl ([`metrics`]), resumable checkpoints ([`checkpoint`]), the
//! run directory's lock, debris and input hashes ([`run_dir`]), the optimiser, clipping and
//! learning-rate schedule ([`optim`]), and the data splits ([`splits`]).

pub mod checkpoint;
pub mod dev;
pub mod metrics;
pub mod optim;
pub mod run_dir;
pub mod splits;
pub mod step;
pub mod trainer;
