//! The tokio runtime every program runs on, sized by `--threads`.

use std::future::Future;

/// The flags every program takes (flattened into its arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Worker threads (0: one per CPU). With all four programs on one small machine, 1 each
    /// spends a little less CPU waking threads (see docs/benchmarks.md).
    #[arg(long, env = "BACKHAUL_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// How log lines (stderr) are written: `text` for people, `json` (one object per line)
    /// for log shippers.
    #[arg(long, env = "BACKHAUL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// A TOML file of settings: keys are the long flag names (`--config-example` prints every
    /// one). Flags and environment variables take precedence over it.
    #[arg(long, value_name = "FILE", env = "BACKHAUL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Runs `main` on a multi-threaded runtime with `threads` workers (0: one per CPU), on a
/// worker rather than on the calling thread, so the program's main loop and its session tasks share
/// the pool and hand work to each other without waking a thread outside it.
pub fn run<F>(program: &str, threads: usize, main: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if threads > 0 {
        builder.worker_threads(threads);
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

/// Parses the command line as `T`, with the settings' other sources (see [`crate::config`]),
/// the way every program reports a bad one: one line on stderr naming the problem (with clap's
/// suggestion, or the config file's line) and exit code 64 (EX_USAGE), like every other
/// configuration error. `--help`, `--version` and `--config-example` print and exit 0.
pub fn parse_args<T: clap::Parser>(program: &str) -> T {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.iter().skip(1).any(|a| a == "--config-example") {
        print!("{}", crate::config::example(program, &T::command()));
        std::process::exit(0);
    }
    let usage = |msg: String| -> ! { fail(program, msg) };
    let cmd = crate::config::prepare(program, T::command(), &argv).unwrap_or_else(|e| usage(e));
    match cmd.try_get_matches_from(argv) {
        Ok(m) => {
            T::from_arg_matches(&m).unwrap_or_else(|e| usage(one_line(&e.render().to_string())))
        }
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
            usage(one_line(&e.render().to_string()))
        }
    }
}

/// Ends the program over a configuration error: one line on stderr, naming where the settings
/// it mentions came from when that was a file or the environment, and exit code 64.
pub fn fail(program: &str, msg: impl std::fmt::Display) -> ! {
    eprintln!(
        "{program}: {}",
        crate::config::annotate(&format!("{msg:#}"))
    );
    std::process::exit(crate::EXIT_CONFIG);
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
