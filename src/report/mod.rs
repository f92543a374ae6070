//! Reports: the demo's report.md.

pub mod demo;
pub use demo::demo_report;
