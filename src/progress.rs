//! Progress of long work: a bar with rate and ETA redrawn in place on a terminal; on anything
//! else (CI, a log file) a plain line at every tenth of the work, so logs stay short.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
    next_plain: usize,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Progress {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            next_plain: 0,
        }
    }

    /// Records `n` more units done, with a short status (e.g. the current loss).
    pub fn advance(&mut self, n: usize, status: &str) {
        self.done = (self.done + n).min(self.total);
        let secs = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / secs.max(1e-9);
        let eta = (self.total - self.done) as f64 / rate.max(1e-9);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 24;
            let filled = width * self.done / self.total.max(1);
            let bar: String = "#".repeat(filled) + &" ".repeat(width - filled);
            let _ = write!(
                err,
                "\r\x1b[2K{} [{bar}] {}/{} {rate:.2}/s ETA {eta:.0}s {status}",
                self.label, self.done, self.total
            );
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else if self.done >= self.next_plain || self.done == self.total {
            let _ = writeln!(
                err,
                "{} {}/{} ({secs:.0}s, ETA {eta:.0}s) {status}",
                self.label, self.done, self.total
            );
            self.next_plain = self.done + self.total.div_ceil(10).max(1);
        }
    }
}
