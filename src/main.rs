use clap::Parser;

fn main() {
    let cli = pocl::cli::Cli::parse();
    if let Err(e) = pocl::cli::run(cli) {
        // One clear line for the user: the error and its causes, no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
