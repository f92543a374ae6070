//! Training: optimiser, clipping and learning-rate schedule (the trainer loop comes with issue 5).

pub mod checkpoint;
pub mod optim;
pub mod splits;
pub mod trainer;
