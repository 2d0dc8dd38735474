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

/// Parses the command line as `T`, the way every program reports a bad one: one line on
/// stderr naming the problem (with clap's suggestion, if it has one) and exit code 64
/// (EX_USAGE), like every other configuration error. `--help` and `--version` print as usual.
pub fn parse_args<T: clap::Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("{program}: {}", one_line(&e.render().to_string()));
            std::process::exit(crate::EXIT_CONFIG);
        }
    }
}

/// clap's error text as one line: the error, then its tip, then where to look.
fn one_line(rendered: &str) -> String {
    let first: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let first = first.join(" ");
    let first = first.trim_start_matches("error: ");
    let first = if first.is_empty() {
        "invalid arguments"
    } else {
        first
    };
    let tips: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tip: "))
        .collect();
    if tips.is_empty() {
        format!("{first}; see --help")
    } else {
        format!("{first} ({}); see --help", tips.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: unexpected argument '--lsten' found\n\n  tip: a similar argument exists: '--listen'\n\nUsage: backhaul-relay [OPTIONS]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "unexpected argument '--lsten' found (a similar argument exists: '--listen'); see --help"
        );
        assert_eq!(
            one_line("error: the following required arguments were not provided:\n  --relay <RELAY>\n\nUsage: x\n"),
            "the following required arguments were not provided: --relay <RELAY>; see --help"
        );
    }
}
