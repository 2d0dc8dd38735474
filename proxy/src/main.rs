use backhaul_common::telemetry;
use backhaul_relay::hub::HubConfig;
use backhaul_relay::Config;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// backhaul-relay: the public server. Frontends open WebSockets at /b/<backend-id>; agents in
/// private networks collect them with outbound HTTP requests to /agent/v1/links.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (HTTP, or HTTPS with --tls-cert/--tls-key).
    #[arg(long, env = "BACKHAUL_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// PEM certificate chain for HTTPS.
    #[arg(long, env = "BACKHAUL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, env = "BACKHAUL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Token agents must send as "Authorization: Bearer <token>". Unset: any agent may register.
    #[arg(long, env = "BACKHAUL_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// Token frontends must send as "Authorization: Bearer <token>" (their --client-token).
    /// Unset: anyone who can reach the relay may open sessions to any connected backend.
    #[arg(long, env = "BACKHAUL_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// How long a poll waits for something to send before answering empty (keep well under the
    /// idle timeout of proxies on the agent's path, typically 60 s).
    #[arg(long, env = "BACKHAUL_POLL_HOLD_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    poll_hold_secs: u64,
    /// How long an agent may go without any request before its link and sessions are closed.
    #[arg(long, env = "BACKHAUL_AGENT_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    agent_timeout_secs: u64,
    /// How long a new session waits for an agent to take it.
    #[arg(long, env = "BACKHAUL_OPEN_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    open_timeout_secs: u64,
    /// Per-session flow-control window in KiB, each direction.
    #[arg(long, env = "BACKHAUL_WINDOW_KIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=65536))]
    window_kib: u32,
    /// Largest batch the relay sends in one poll response, in KiB.
    #[arg(long, env = "BACKHAUL_MAX_BATCH_KIB", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..=65536))]
    max_batch_kib: u32,
    /// Largest WebSocket message a client may send, in KiB; a larger one closes the session
    /// with code 1009 ("message too big") and says the limit.
    #[arg(long, env = "BACKHAUL_MAX_MESSAGE_KIB", default_value_t = backhaul_common::DEFAULT_MAX_MESSAGE_KIB, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    max_message_kib: u64,
    /// Most sessions held at once.
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS", default_value_t = 20000)]
    max_sessions: usize,
    /// Most sessions waiting for an agent per backend.
    #[arg(long, env = "BACKHAUL_MAX_PENDING", default_value_t = 1024)]
    max_pending: usize,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("backhaul-relay: {msg:#}");
    std::process::exit(backhaul_common::EXIT_CONFIG);
}

fn main() {
    let args = Args::parse();
    backhaul_common::runtime::run("backhaul-relay", args.runtime, serve(args));
}

async fn serve(args: Args) {
    telemetry::init("info");
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            backhaul_common::tls::server_config(cert, key, &[b"h2".to_vec(), b"http/1.1".to_vec()])
                .unwrap_or_else(|e| fail(format!("TLS setup failed: {e:#}"))),
        ),
        _ => None,
    };
    let config = Config {
        hub: HubConfig {
            poll_hold: Duration::from_secs(args.poll_hold_secs),
            agent_timeout: Duration::from_secs(args.agent_timeout_secs),
            open_timeout: Duration::from_secs(args.open_timeout_secs),
            window: args.window_kib * 1024,
            max_batch_bytes: args.max_batch_kib as usize * 1024,
            max_sessions: args.max_sessions,
            max_pending_per_backend: args.max_pending,
            max_message: args.max_message_kib * 1024,
        },
        agent_token: args.agent_token.filter(|t| !t.is_empty()),
        client_token: args.client_token.filter(|t| !t.is_empty()),
        tls,
    };
    let listener = backhaul_relay::bind(&args.listen)
        .await
        .unwrap_or_else(|e| fail(format!("{e:#}")));
    match listener.local_addr() {
        Ok(addr) => telemetry::announce_listening("backhaul-relay", addr),
        Err(e) => fail(format!("listener has no address: {e}")),
    }
    let shutdown = telemetry::shutdown_on_signals();
    if let Err(e) = backhaul_relay::run(config, listener, shutdown).await {
        eprintln!("backhaul-relay: {e:#}");
        std::process::exit(1);
    }
}
