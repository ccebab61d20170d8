use clap::Parser;

// mimalloc: candle allocates a fresh buffer per op; glibc's per-thread arenas kept freed
// activation buffers (training peaked 50 % higher) and refaulted large ones.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e`: 15 in both the v2 and the v3 sources
/// libmimalloc-sys ships (it builds v3; it names no constant for this one); -1 turns purging
/// off.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Freed memory stays with the process instead of going back to the OS after a delay:
    // candle's per-op buffers are allocated and freed at the same sizes each layer and step,
    // and a purged page comes back zeroed by the kernel on first touch (a LoRA step on the
    // default model at 1,024 tokens spent a tenth of its time there). The peak is unchanged.
    // SAFETY: setting an option has no preconditions; nothing else runs yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
