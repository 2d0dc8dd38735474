//! Logging set-up, the machine-readable "ready" lines on stdout, and shutdown signals.
//!
//! Logs go to stderr through `tracing`. Stdout carries only a few stable lines that scripts and
//! tests wait for instead of sleeping:
//! - `<program>: listening on <addr>` once a listener is bound (`<addr>` parses as a socket address);
//! - `<program>: connected to relay ...` each time the agent (re)registers with the relay.

use crate::runtime::LogFormat;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// Installs the tracing subscriber, writing `format` to stderr. `RUST_LOG` overrides
/// `default_level` (for example `info`).
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // One JSON object per line: the event's fields at the top level, the spans it happened
        // in (session, connection) under "spans".
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// Prints the `listening on` ready line for `program`.
pub fn announce_listening(program: &str, addr: SocketAddr) {
    announce(&format!("{program}: listening on {addr}"));
}

/// Prints one ready line to stdout and flushes it at once (stdout may be a pipe).
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A token cancelled on the first SIGINT or SIGTERM, which starts a graceful drain. A second
/// signal exits at once with status 130.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining (send the signal again to exit now)");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal; exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
