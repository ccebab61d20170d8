use clap::Parser;

// mimalloc: candle allocates a fresh buffer per op; glibc's per-thread arenas kept freed
// activation buffers (training peaked 50 % higher) and refaulted large ones.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = wildlong::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WILDLONG_LOG"))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = wildlong::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
