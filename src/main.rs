use clap::Parser;

fn main() {
    let cli = pocl::cli::Cli::parse();
    if let Err(e) = pocl::cli::run(cli) {
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
