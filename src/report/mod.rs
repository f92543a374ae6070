//! Figures for the demo's `report.md`.
//!
//! - [`plot`]: dependency-free line charts and histograms rendered to PNG.

pub mod plot;
