//! Progress of long work (training stages, difficulty scoring, evaluation, SeqKD data, and so
//! the demo): one mechanism for all of them. On a terminal, an `indicatif` bar with rate, ETA
//! and a status redrawn in place on stderr; on anything else (CI, a log file) plain lines, so a
//! log gets a few lines per task rather than one per step.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// The bar's layout on a terminal.
const TEMPLATE: &str = "{prefix} [{bar:24}] {pos}/{len} {per_sec} ETA {eta} {msg}";

/// Plain lines come at most this often (seconds), except the last one.
const PLAIN_EVERY_SECS: f64 = 10.0;

pub struct Progress {
    bar: ProgressBar,
    plain: Option<Plain>,
    start: Instant,
}

impl Progress {
    /// A bar on a terminal, plain lines otherwise (decided by whether stderr is a terminal).
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        let label = label.into();
        if std::io::stderr().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(style().progress_chars("#>-"));
            bar.set_prefix(label);
            Progress {
                bar,
                plain: None,
                start: Instant::now(),
            }
        } else {
            Progress {
                bar: ProgressBar::hidden(),
                plain: Some(Plain::new(label, total)),
                start: Instant::now(),
            }
        }
    }

    /// Records `n` more units done, with a short status (e.g. the current loss).
    pub fn advance(&mut self, n: usize, status: &str) {
        let done = self.bar.position() as usize + n;
        self.set(done, status);
    }

    /// Records that `done` units are done in all.
    pub fn set(&mut self, done: usize, status: &str) {
        self.bar.set_position(done as u64);
        self.bar.set_message(status.to_string());
        if let Some(plain) = &mut self.plain {
            if let Some(line) = plain.line(done, self.start.elapsed().as_secs_f64(), status) {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
        if self.plain.is_none() && done as u64 >= self.bar.length().unwrap_or(0) {
            self.bar.finish();
        }
    }
}

impl Drop for Progress {
    /// Work that ends early (an error, a stop) leaves its bar on screen where it stopped.
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.abandon();
        }
    }
}

/// The terminal bar's style.
fn style() -> ProgressStyle {
    ProgressStyle::with_template(TEMPLATE).expect("TEMPLATE is a valid indicatif template")
}

/// When to print a plain line, and what it says: at each tenth of the work but at most every
/// [`PLAIN_EVERY_SECS`] seconds, and always when the work is complete. Kept free of clocks and
/// I/O so that it can be tested.
pub struct Plain {
    label: String,
    total: usize,
    next: usize,
    last_secs: Option<f64>,
    finished: bool,
}

impl Plain {
    pub fn new(label: String, total: usize) -> Self {
        Plain {
            label,
            total,
            next: 0,
            last_secs: None,
            finished: false,
        }
    }

    /// The line to print now that `done` units are done after `secs` seconds, if one is due.
    pub fn line(&mut self, done: usize, secs: f64, status: &str) -> Option<String> {
        let done = done.min(self.total);
        let complete = done == self.total;
        let rested = self.last_secs.is_none_or(|t| secs - t >= PLAIN_EVERY_SECS);
        if !(complete || (done >= self.next && rested)) || self.finished {
            return None;
        }
        self.finished = complete;
        self.next = done + self.total.div_ceil(10).max(1);
        self.last_secs = Some(secs);
        let rate = done as f64 / secs.max(1e-9);
        let eta = (self.total - done) as f64 / rate.max(1e-9);
        let sep = if status.is_empty() { "" } else { " " };
        Some(if complete {
            format!(
                "{} {done}/{} done in {secs:.0}s{sep}{status}",
                self.label, self.total
            )
        } else {
            format!(
                "{} {done}/{} ({secs:.0}s, {rate:.2}/s, ETA {eta:.0}s){sep}{status}",
                self.label, self.total
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminal_template_parses() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }

    /// Lines printed for 100 steps taken one per `step_secs` seconds.
    fn lines(step_secs: f64) -> Vec<String> {
        let mut p = Plain::new("stage 1/2".into(), 100);
        (1..=100)
            .filter_map(|d| p.line(d, d as f64 * step_secs, "loss 1.0"))
            .collect()
    }

    #[test]
    fn plain_lines_come_every_tenth_when_steps_are_slow() {
        let l = lines(20.0);
        assert_eq!(l.len(), 11, "{l:#?}");
        assert_eq!(l[0], "stage 1/2 1/100 (20s, 0.05/s, ETA 1980s) loss 1.0");
        assert!(l[1].starts_with("stage 1/2 11/100 "), "{}", l[1]);
        assert_eq!(l[10], "stage 1/2 100/100 done in 2000s loss 1.0");
    }

    #[test]
    fn plain_lines_are_rate_limited_and_the_last_always_comes() {
        // 100 steps in 5 s: the first line, then only the final one.
        let l = lines(0.05);
        assert_eq!(l.len(), 2, "{l:#?}");
        assert!(l[1].starts_with("stage 1/2 100/100 done in 5s"));
        // 100 steps in 40 s: a line at most every 10 s, at tenth boundaries.
        let l = lines(0.4);
        assert_eq!(l.len(), 5, "{l:#?}");
        // Past the end, and repeated completion, print nothing more.
        let mut p = Plain::new("x".into(), 3);
        assert!(p.line(3, 1.0, "").is_some());
        assert!(p.line(3, 100.0, "").is_none());
        assert!(p.line(9, 200.0, "").is_none());
        // Empty work completes at once.
        assert_eq!(
            Plain::new("y".into(), 0).line(0, 0.0, "").unwrap(),
            "y 0/0 done in 0s"
        );
    }
}
