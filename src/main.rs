use clap::Parser;

mod cli;

/// Training allocates and frees many large tensors per step. glibc serves those with mmap and
/// returns them with munmap, so every op paid page faults and cross-core TLB flushes (about a
/// third of a small model's step time, measured with perf). Keeping freed blocks in the heap
/// (a fixed 32 MiB mmap threshold, glibc's maximum, and no trimming) removes that cost.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    tune_allocator();
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        // One clear line for the user: the error and its causes. candle appends a backtrace to
        // its errors when RUST_BACKTRACE is set; that stays out of the user's line.
        // POCL_BACKTRACE=1 shows everything, for bug reports.
        let msg = format!("{e:#}");
        if std::env::var_os("POCL_BACKTRACE").is_some() {
            eprintln!("error: {msg}");
        } else {
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
        }
        std::process::exit(1);
    }
}
