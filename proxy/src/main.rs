use backhaul_common::secret::{self, Secret};
use backhaul_common::telemetry;
use backhaul_relay::auth::Policy;
use backhaul_relay::conn::{self, ConnConfig};
use backhaul_relay::expose;
use backhaul_relay::hub::HubConfig;
use backhaul_relay::{AdminAccess, Config};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// backhaul-relay: the public server. Frontends open WebSockets at /b/<backend-id>; agents in
/// private networks collect them with outbound HTTP requests to /agent/v1/links.
#[derive(Debug, Parser)]
#[command(version = backhaul_common::VERSION, after_help = "Example:
  backhaul-relay --listen 0.0.0.0:8080 --credentials /etc/backhaul/credentials.toml

Every flag is also the variable BACKHAUL_RELAY_<FLAG> and the key <flag> of the TOML file given
by --config; flags win, then variables, then the file. --config-example prints every key.
More: README.md and docs/ in the source tree.", about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (HTTP, or HTTPS with --tls-cert/--tls-key).
    #[arg(long, env = "BACKHAUL_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// PEM certificate chain for HTTPS.
    #[arg(long, env = "BACKHAUL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, env = "BACKHAUL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Per-backend credentials (TOML; see dist/credentials.toml): for each backend ID, the
    /// hashes of its agents' secrets and of the client secrets that may reach it. Read again on
    /// SIGHUP. Replaces --agent-token and --client-token.
    #[arg(long, env = "BACKHAUL_CREDENTIALS", conflicts_with_all = ["agent_token", "agent_token_file", "client_token", "client_token_file"])]
    credentials: Option<PathBuf>,
    /// One token for every agent, sent as "Authorization: Bearer <token>" (one-site setup).
    /// Without it and without --credentials, any agent may register for any backend.
    #[arg(long, env = "BACKHAUL_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// File holding the agent token (keeps it out of `ps`).
    #[arg(long, env = "BACKHAUL_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// One token for every frontend (their --client-token). Without it and without
    /// --credentials, anyone who can reach the relay may open sessions to any backend.
    #[arg(long, env = "BACKHAUL_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// File holding the client token.
    #[arg(long, env = "BACKHAUL_CLIENT_TOKEN_FILE")]
    client_token_file: Option<PathBuf>,
    /// Token for /metrics and /status (`Authorization: Bearer <token>`); without it (or
    /// --admin-loopback) they are off. Prefer --admin-token-file (a flag shows in `ps`).
    #[arg(long, env = "BACKHAUL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(long, env = "BACKHAUL_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serve /metrics and /status without a token to requests from loopback (ssh -L, a local
    /// Prometheus). Do not use it when something on this host forwards outside traffic to the
    /// relay (a reverse proxy, a tunnel): those requests come from loopback too.
    #[arg(long, env = "BACKHAUL_ADMIN_LOOPBACK", conflicts_with_all = ["admin_token", "admin_token_file"])]
    admin_loopback: bool,
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
    /// Per-session flow-control window in KiB, each direction, when a session starts (what an
    /// idle session costs).
    #[arg(long, env = "BACKHAUL_WINDOW_KIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=65536))]
    window_kib: u32,
    /// Largest batch the relay sends in one poll response, in KiB.
    #[arg(long, env = "BACKHAUL_MAX_BATCH_KIB", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..=65536))]
    max_batch_kib: u32,
    /// How far a session's window may grow, in KiB, while its sender is held back by it and
    /// its receiver keeps up: the bandwidth-delay product of the longest, fastest path to serve
    /// (the agent follows the relay's figure).
    #[arg(long, env = "BACKHAUL_MAX_WINDOW_KIB", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(64..=1 << 20))]
    max_window_kib: u32,
    /// Window growth all sessions together may be granted, in MiB: with the initial windows,
    /// the most session buffers can hold.
    #[arg(long, env = "BACKHAUL_WINDOW_BUDGET_MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    window_budget_mib: u64,
    /// Ports agents may have their backend exposed on (agent --expose), FIRST-LAST: plain TCP
    /// clients connect to them, no frontend needed. None by default.
    #[arg(long, env = "BACKHAUL_EXPOSE_PORTS")]
    expose_ports: Option<String>,
    /// How long an exposed port stays with its backend after its last agent left, so a
    /// restarted agent gets the same port back.
    #[arg(long, env = "BACKHAUL_EXPOSE_GRACE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    expose_grace_secs: u64,
    /// Largest WebSocket message a client may send, in KiB; a larger one closes the session
    /// with code 1009 ("message too big") and says the limit.
    #[arg(long, env = "BACKHAUL_MAX_MESSAGE_KIB", default_value_t = backhaul_common::DEFAULT_MAX_MESSAGE_KIB, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    max_message_kib: u64,
    /// Most sessions held at once.
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS", default_value_t = 20000, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: u64,
    /// Most sessions one backend may hold at once (a credentials file may set its own).
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS_PER_BACKEND", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions_per_backend: u64,
    /// Most sessions one client address may hold at once.
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS_PER_CLIENT", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions_per_client: u64,
    /// Most HTTP connections open at once (WebSocket sessions count under --max-sessions).
    #[arg(long, env = "BACKHAUL_MAX_CONNECTIONS", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Most HTTP connections one client address may hold at once.
    #[arg(long, env = "BACKHAUL_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_client: u64,
    /// How long a new connection has to complete its TLS handshake and first request's headers.
    #[arg(long, env = "BACKHAUL_FIRST_REQUEST_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    first_request_timeout_secs: u64,
    /// How long a connection with no request in flight stays open (held polls and streams are
    /// requests in flight).
    #[arg(long, env = "BACKHAUL_IDLE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_timeout_secs: u64,
    /// Most sessions waiting for an agent per backend.
    #[arg(long, env = "BACKHAUL_MAX_PENDING", default_value_t = 1024)]
    max_pending: usize,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    backhaul_common::runtime::fail("backhaul-relay", msg)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new random secret and the hash to put in a credentials file.
    NewSecret,
    /// Read a secret from standard input and print the hash to put in a credentials file.
    HashSecret,
}

fn main() {
    let args: Args = backhaul_common::runtime::parse_args("backhaul-relay");
    match args.command {
        Some(Command::NewSecret) => {
            let s = Secret::generate();
            println!("secret: {}", s.expose());
            println!("hash:   {}", s.hash());
            println!("Give the secret to the agent or client (--agent-token-file / --client-token-file) and put the hash in the relay's credentials file.");
        }
        Some(Command::HashSecret) => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                fail(format!(
                    "could not read the secret from standard input: {e}"
                ));
            }
            match secret::load(
                "secret",
                Some(line.trim_end_matches(['\n', '\r']).to_string()),
                None,
            ) {
                Ok(Some(s)) => println!("{}", s.hash()),
                Ok(None) => unreachable!("a value was given"),
                Err(e) => fail(e),
            }
        }
        None => backhaul_common::runtime::run("backhaul-relay", args.runtime.threads, serve(args)),
    }
}

/// The credentials policy the flags ask for.
fn policy(args: &Args) -> Policy {
    if let Some(path) = &args.credentials {
        return Policy::from_file(path).unwrap_or_else(|e| fail(e));
    }
    let agent = secret::load(
        "agent-token",
        args.agent_token.clone(),
        args.agent_token_file.as_deref(),
    )
    .unwrap_or_else(|e| fail(e));
    let client = secret::load(
        "client-token",
        args.client_token.clone(),
        args.client_token_file.as_deref(),
    )
    .unwrap_or_else(|e| fail(e));
    for (flag, s) in [("--agent-token", &agent), ("--client-token", &client)] {
        if s.as_ref().is_some_and(|s| s.expose().len() < 16) {
            tracing::warn!("{flag} is shorter than 16 characters; use a random one (backhaul-relay new-secret)");
        }
    }
    Policy::shared(agent.as_ref(), client.as_ref())
}

async fn serve(args: Args) {
    telemetry::init("info", args.runtime.log_format);
    let policy = policy(&args);
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
            max_window: args.max_window_kib.max(args.window_kib) * 1024,
            window_budget: (args.window_budget_mib as usize) << 20,
            max_batch_bytes: args.max_batch_kib as usize * 1024,
            max_sessions: args.max_sessions as usize,
            max_sessions_per_backend: args.max_sessions_per_backend as usize,
            max_sessions_per_client: args.max_sessions_per_client as usize,
            max_pending_per_backend: args.max_pending,
            max_message: args.max_message_kib * 1024,
        },
        policy,
        conn: ConnConfig {
            max_connections: args.max_connections as usize,
            max_connections_per_client: args.max_connections_per_client as usize,
            first_request_timeout: Duration::from_secs(args.first_request_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        },
        tls,
        expose: None,
        admin: match secret::load(
            "admin-token",
            args.admin_token.clone(),
            args.admin_token_file.as_deref(),
        )
        .unwrap_or_else(|e| fail(e))
        {
            Some(token) => AdminAccess::Token(token.hash()),
            None if args.admin_loopback => AdminAccess::Loopback,
            None => AdminAccess::Off,
        },
    };
    check_open_files(args.max_connections + args.max_sessions);
    let listener = backhaul_relay::bind(&args.listen)
        .await
        .unwrap_or_else(|e| fail(format!("{e:#}")));
    let mut config = config;
    if let Some(ports) = &args.expose_ports {
        let ports =
            expose::parse_ports(ports).unwrap_or_else(|e| fail(format!("--expose-ports: {e}")));
        let ip = listener
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or_else(|e| fail(format!("listener has no address: {e}")));
        config.expose = Some(expose::ExposeConfig {
            ports,
            ip,
            grace: Duration::from_secs(args.expose_grace_secs),
        });
    }
    match listener.local_addr() {
        Ok(addr) => {
            if config.policy.is_open() && !addr.ip().is_loopback() {
                tracing::warn!(
                    "listening on {addr} without credentials for {}: anyone who reaches this address can {}. Use --credentials (per backend) or --agent-token and --client-token",
                    match &config.policy { Policy::Shared { agent: Some(_), .. } => "clients", Policy::Shared { client: Some(_), .. } => "agents", _ => "agents or clients" },
                    match &config.policy { Policy::Shared { agent: Some(_), .. } => "open sessions to any backend", Policy::Shared { client: Some(_), .. } => "register as any backend's agent and receive its sessions", _ => "serve any backend and open sessions to it" },
                );
            }
            telemetry::announce_listening("backhaul-relay", addr)
        }
        Err(e) => fail(format!("listener has no address: {e}")),
    }
    let shutdown = telemetry::shutdown_on_signals();
    if let Err(e) = backhaul_relay::run(config, listener, shutdown).await {
        eprintln!("backhaul-relay: {e:#}");
        std::process::exit(1);
    }
}

/// Raises the open-files limit and warns when it cannot hold every connection and session the
/// limits allow (each is one file descriptor).
fn check_open_files(wanted: u64) {
    match conn::raise_open_files_limit() {
        Ok(limit) if limit < wanted + 64 => tracing::warn!(
            "the open-files limit is {limit}, below --max-connections + --max-sessions ({wanted}); the relay will fail to accept before its own limits refuse. Raise the hard limit (LimitNOFILE= in systemd, --ulimit nofile= in docker) or lower those flags"
        ),
        Ok(limit) => tracing::debug!("open-files limit: {limit}"),
        Err(e) => tracing::warn!("could not raise the open-files limit: {e}"),
    }
}
