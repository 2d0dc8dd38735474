//! The tokio runtime every program runs on, sized by `--threads`.

use std::future::Future;

/// The flags every program takes (flattened into its arguments).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RuntimeArgs {
    /// Worker threads (0: one per CPU). With all four programs on one small machine, 1 each
    /// spends a little less CPU waking threads (see docs/benchmarks.md).
    #[arg(long, env = "BACKHAUL_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// How log lines (stderr) are written: `text` for people, `json` (one object per line)
    /// for log shippers.
    #[arg(long, env = "BACKHAUL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Runs `main` on a multi-threaded runtime with `args.threads` workers (0: one per CPU), on a
/// worker rather than on the calling thread, so the program's main loop and its session tasks share
/// the pool and hand work to each other without waking a thread outside it.
pub fn run<F>(program: &str, args: RuntimeArgs, main: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: could not start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        match tokio::spawn(main).await {
            Ok(out) => out,
            Err(e) => {
                eprintln!("{program}: main task failed: {e}");
                std::process::exit(1);
            }
        }
    })
}
