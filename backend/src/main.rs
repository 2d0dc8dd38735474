use backhaul_backend::Config;
use backhaul_common::secret;
use backhaul_common::telemetry;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// backhaul-backend: a WebSocket server that turns each WebSocket session into a TCP connection
/// to the target service. The agent dials it; clients never see it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on for WebSocket sessions. Whoever can reach it can open sessions to
    /// --target: keep it on loopback or a private network only the agent can reach, and set
    /// --backend-secret where others can reach it too.
    #[arg(long, env = "BACKHAUL_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// The service to connect each session to, as HOST:PORT.
    #[arg(long, env = "BACKHAUL_TARGET")]
    target: String,
    /// How long to wait for the target to accept a connection.
    #[arg(long, env = "BACKHAUL_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    connect_timeout_secs: u64,
    /// Most sessions at once; further clients wait.
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS", default_value_t = 20000)]
    max_sessions: usize,
    /// Secret the agent must present (its --backend-secret, the same value), which it sends in
    /// the X-Backhaul-Secret handshake header; handshakes without it get 401. A flag shows in
    /// `ps`: prefer the environment or --backend-secret-file. Refused when empty.
    #[arg(long, env = "BACKHAUL_BACKEND_SECRET", hide_env_values = true)]
    backend_secret: Option<String>,
    /// File holding the backend secret on one line, instead of --backend-secret.
    #[arg(long, env = "BACKHAUL_BACKEND_SECRET_FILE")]
    backend_secret_file: Option<PathBuf>,
    /// Serve handshakes whose Origin header is ORIGIN (scheme://host[:port]); repeat the flag
    /// (or separate with commas) for more, or give * for any. A handshake with an Origin not
    /// allowed gets 403; one without Origin (the agent's own) is served. The relay passes a
    /// browser client's Origin on to the backend, so a browser app reaching this backend
    /// through the stack is refused until its origin is allowed here.
    #[arg(
        long = "allow-origin",
        value_name = "ORIGIN",
        env = "BACKHAUL_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    allow_origin: Vec<String>,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("backhaul-backend: {msg}");
    std::process::exit(backhaul_common::EXIT_CONFIG);
}

fn main() {
    let args = Args::parse();
    backhaul_common::runtime::run("backhaul-backend", args.runtime, serve(args));
}

async fn serve(args: Args) {
    telemetry::init("info");
    let secret = secret::load(
        "backend-secret",
        args.backend_secret,
        args.backend_secret_file.as_deref(),
    )
    .unwrap_or_else(|e| fail(e));
    let origins = backhaul_backend::admission::OriginPolicy::parse(&args.allow_origin)
        .unwrap_or_else(|e| fail(e));
    match args.target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => fail(format!("--target {:?} must be HOST:PORT", args.target)),
    }
    if args.max_sessions == 0 {
        fail("--max-sessions must be at least 1");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .unwrap_or_else(|e| fail(format!("could not listen on {}: {e}", args.listen)));
    match listener.local_addr() {
        Ok(addr) => telemetry::announce_listening("backhaul-backend", addr),
        Err(e) => fail(format!("listener has no address: {e}")),
    }
    let config = Config {
        target: args.target,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        max_sessions: args.max_sessions,
        secret: secret.map(|s| s.hash()),
        origins,
    };
    let shutdown = telemetry::shutdown_on_signals();
    if let Err(e) = backhaul_backend::run(config, listener, shutdown).await {
        eprintln!("backhaul-backend: {e:#}");
        std::process::exit(1);
    }
}
