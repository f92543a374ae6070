//! The POCL curriculum: difficulty fusion and bucketing (fuse.rs) and the stage schedule
//! (schedule.rs). The measurer, which needs a model and data, comes with the trainer.

pub mod fuse;
pub mod measure;
pub mod schedule;
