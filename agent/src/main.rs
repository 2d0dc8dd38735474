use backhaul_agent::Config;
use backhaul_common::secret::{self, Secret};
use backhaul_common::telemetry;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// backhaul-agent: runs inside the private network and serves one backend. It only connects out
/// to the relay, through HTTP_PROXY/HTTPS_PROXY if set, on the fastest transport the path allows
/// (WebSocket, HTTP/2 stream, or HTTP/1.1 long-poll), and dials the backend's WebSocket for each
/// session.
#[derive(Debug, Parser)]
#[command(version = backhaul_common::VERSION, after_help = "Example:
  backhaul-agent --relay http://relay.example:8080 --backend-id office-ssh --backend tcp://127.0.0.1:22 --agent-token-file /etc/backhaul/agent.secret

Every flag is also the variable BACKHAUL_AGENT_<FLAG> and the key <flag> of the TOML file given
by --config; flags win, then variables, then the file. --config-example prints every key.
More: README.md and docs/ in the source tree.", about)]
struct Args {
    /// The relay's URL, e.g. http://relay.example:8080 or https://relay.example (a frontend's
    /// ws:// or wss:// URL for the same relay works too).
    #[arg(long, env = "BACKHAUL_RELAY")]
    relay: String,
    /// Ask the relay to expose the backend on a public TCP port of its --expose-ports range:
    /// plain TCP clients (ssh, nc, a database client) connect there, with no frontend. The
    /// agent prints the port.
    #[arg(long, env = "BACKHAUL_EXPOSE")]
    expose: bool,
    /// With --expose: the client addresses the exposed port admits, a network (10.0.0.0/8)
    /// or an address; repeatable. Without it, any client that reaches the port.
    #[arg(
        long = "expose-allow",
        env = "BACKHAUL_EXPOSE_ALLOW",
        value_delimiter = ','
    )]
    expose_allow: Vec<String>,
    /// Like --expose, on this port (it must be free and in the relay's range).
    #[arg(long, env = "BACKHAUL_EXPOSE_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    expose_port: Option<u16>,
    /// The backend ID this agent serves (frontends ask for it by name).
    #[arg(long, env = "BACKHAUL_BACKEND_ID")]
    backend_id: String,
    /// What each session reaches: a backend's WebSocket URL (ws://127.0.0.1:9000, e.g. a
    /// backhaul-backend), or a TCP service straight from the agent (tcp://127.0.0.1:22), which
    /// needs no backhaul-backend: clients then speak the TCP convention (binary messages, an
    /// empty one for end-of-stream), as backhaul-frontend does.
    #[arg(long, env = "BACKHAUL_BACKEND")]
    backend: String,
    /// Token the relay requires from agents (its --agent-token). A flag shows in `ps`: prefer
    /// the environment or --agent-token-file. Refused when empty.
    #[arg(long, env = "BACKHAUL_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// File holding the agent token on one line, instead of --agent-token.
    #[arg(long, env = "BACKHAUL_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// Secret the backend requires (the backend's --backend-secret), sent to it in the
    /// X-Backhaul-Secret handshake header. Refused when empty.
    #[arg(long, env = "BACKHAUL_BACKEND_SECRET", hide_env_values = true)]
    backend_secret: Option<String>,
    /// File holding the backend secret on one line, instead of --backend-secret.
    #[arg(long, env = "BACKHAUL_BACKEND_SECRET_FILE")]
    backend_secret_file: Option<PathBuf>,
    /// Tell clients why the backend could not be reached: its address and the error, in the
    /// session's close reason (code 1014). Without it they get "backend unavailable" and only
    /// this agent's log has the details, so that whoever may open sessions cannot use the
    /// agent to probe the private network.
    #[arg(long, env = "BACKHAUL_REPORT_BACKEND_ERRORS")]
    report_backend_errors: bool,
    /// Extra CA certificate (PEM) to trust for an https:// relay or a wss:// backend.
    #[arg(long, env = "BACKHAUL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Largest WebSocket message the backend may send, in KiB; a larger one closes the session
    /// with code 1009 ("message too big") and says the limit.
    #[arg(long, env = "BACKHAUL_MAX_MESSAGE_KIB", default_value_t = backhaul_common::DEFAULT_MAX_MESSAGE_KIB, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    max_message_kib: u64,
    /// Most sessions served at once.
    #[arg(long, env = "BACKHAUL_MAX_SESSIONS", default_value_t = 20000)]
    max_sessions: usize,
    /// Window growth all sessions together may be granted, in MiB (how far one session's
    /// window grows is the relay's --max-window-kib).
    #[arg(long, env = "BACKHAUL_WINDOW_BUDGET_MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    window_budget_mib: u64,
    /// How long to wait for the backend to accept a session's WebSocket.
    #[arg(long, env = "BACKHAUL_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    connect_timeout_secs: u64,
    /// Transport to the relay: auto (try websocket, then http2, then longpoll, and say in the log
    /// which one carries the link and why), or force one of websocket, http2, longpoll.
    #[arg(long, env = "BACKHAUL_TRANSPORT", default_value = "auto")]
    transport: backhaul_agent::transport::TransportChoice,
    /// Check the configuration and exit: register with the relay once, connect to the
    /// backend once, print what worked or what did not, and exit 0 when both did (1
    /// otherwise). For health checks (compose, systemd).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("backhaul-agent: {msg}");
    std::process::exit(backhaul_common::EXIT_CONFIG);
}

/// The secret of `--<flag>` or `--<flag>-file`, if given; exits when it is empty, given twice,
/// unreadable, or not header text.
fn load_secret(flag: &str, value: Option<String>, file: Option<&Path>) -> Option<Secret> {
    secret::load(flag, value, file).unwrap_or_else(|e| fail(e))
}

fn parse_url(what: &str, s: &str, schemes: &[&str]) -> url::Url {
    let u =
        url::Url::parse(s).unwrap_or_else(|e| fail(format!("--{what} {s:?} is not a URL: {e}")));
    if !schemes.contains(&u.scheme()) {
        fail(format!(
            "--{what} {s:?} must start with {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if u.host_str().is_none() {
        fail(format!("--{what} {s:?} has no host"));
    }
    u
}

fn main() {
    let args: Args = backhaul_common::runtime::parse_args("backhaul-agent");
    backhaul_common::runtime::run("backhaul-agent", args.runtime.threads, serve(args));
}

async fn serve(args: Args) {
    telemetry::init(
        if args.check { "warn" } else { "info" },
        args.runtime.log_format,
    );
    let check = args.check;
    let agent_token = load_secret(
        "agent-token",
        args.agent_token,
        args.agent_token_file.as_deref(),
    );
    let backend_secret = load_secret(
        "backend-secret",
        args.backend_secret,
        args.backend_secret_file.as_deref(),
    );
    // The frontend's ws:// and wss:// name the same relay: take them as http:// and https://.
    let mut relay = parse_url("relay", &args.relay, &["http", "https", "ws", "wss"]);
    let web_scheme = match relay.scheme() {
        "ws" => Some("http"),
        "wss" => Some("https"),
        _ => None,
    };
    if let Some(scheme) = web_scheme {
        let mut as_web = relay.to_string();
        as_web.replace_range(..relay.scheme().len(), scheme);
        relay = url::Url::parse(&as_web)
            .unwrap_or_else(|e| fail(format!("--relay {:?}: {e}", args.relay)));
    }
    let backend = parse_url("backend", &args.backend, &["ws", "wss", "tcp"]);
    if backend.scheme() == "tcp" {
        let s = &args.backend;
        if backend.port().is_none() {
            fail(format!("--backend {s:?} needs a port: tcp://HOST:PORT"));
        }
        if !matches!(backend.path(), "" | "/") || backend.query().is_some() {
            fail(format!(
                "--backend {s:?}: a tcp:// backend is HOST:PORT only, without a path or query"
            ));
        }
    }
    if let Err(e) = backhaul_common::api::parse_allow(&args.expose_allow) {
        fail(format!("--expose-allow: {e}"));
    }
    if !args.expose_allow.is_empty() && !args.expose && args.expose_port.is_none() {
        fail("--expose-allow needs --expose or --expose-port".to_string());
    }
    if let Err(e) = backhaul_common::api::validate_backend_id(&args.backend_id) {
        fail(format!("--backend-id: {e}"));
    }
    let tls = args.ca_cert.as_deref().map(|ca| {
        backhaul_common::tls::client_config(Some(ca))
            .unwrap_or_else(|e| fail(format!("--ca-cert: {e:#}")))
    });
    let config = Config {
        relay,
        backend_id: args.backend_id,
        backend,
        max_message: args.max_message_kib * 1024,
        agent_token,
        backend_secret,
        report_backend_errors: args.report_backend_errors,
        tls,
        max_sessions: args.max_sessions,
        window_budget: backhaul_common::window::Budget::new(
            (args.window_budget_mib as usize) << 20,
        ),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        transport: args.transport,
        expose: (args.expose || args.expose_port.is_some()).then_some(
            backhaul_common::api::ExposeRequest {
                port: args.expose_port,
                allow: args.expose_allow.clone(),
            },
        ),
    };
    if check {
        match backhaul_agent::check(config).await {
            Ok(what) => {
                println!("backhaul-agent: check passed: {what}");
                std::process::exit(0);
            }
            Err(why) => {
                println!("backhaul-agent: check failed: {why}");
                std::process::exit(1);
            }
        }
    }
    let shutdown = telemetry::shutdown_on_signals();
    if let Err(e) = backhaul_agent::run(config, shutdown).await {
        eprintln!("backhaul-agent: {e:#}");
        std::process::exit(1);
    }
}
