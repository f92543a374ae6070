//! Reports: the demo's report.md and its figures.
//!
//! - [`demo`]: the results table, POCL's gain per method, compute.
//! - [`plot`]: dependency-free line charts and histograms rendered to PNG.

pub mod demo;
pub mod plot;
pub use demo::demo_report;
