use backhaul_agent::{Config, Service};
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
    /// The backend ID this agent serves (frontends ask for it by name). With --backend; for
    /// more than one, --serve.
    #[arg(long, env = "BACKHAUL_BACKEND_ID", requires = "backend")]
    backend_id: Option<String>,
    /// Serve backend ID at URL (a ws://, wss:// or tcp:// URL as --backend takes), each over a
    /// link of its own; repeatable, and beside --backend-id/--backend. In a --config file
    /// (`serve = ["wiki=ws://127.0.0.1:9000", "ssh=tcp://127.0.0.1:22"]`) the list is read
    /// again on SIGHUP: added backends start, removed ones stop, the others' sessions go on.
    #[arg(long, value_name = "ID=URL")]
    serve: Vec<String>,
    /// What each session reaches: a backend's WebSocket URL (ws://127.0.0.1:9000, e.g. a
    /// backhaul-backend), or a TCP service straight from the agent (tcp://127.0.0.1:22), which
    /// needs no backhaul-backend: clients then speak the TCP convention (binary messages, an
    /// empty one for end-of-stream), as backhaul-frontend does.
    #[arg(long, env = "BACKHAUL_BACKEND", requires = "backend_id")]
    backend: Option<String>,
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
    /// Most sessions served at once, per backend (each --serve has its own).
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
    /// Serve the agent's metrics (OpenMetrics text, GET /metrics) on this address, e.g.
    /// 127.0.0.1:9464. Anyone who reaches it can read them: keep it on loopback or a
    /// monitoring network.
    #[arg(long, value_name = "ADDR", env = "BACKHAUL_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Check the configuration and exit: register with the relay once, connect to the
    /// backend once, print what worked or what did not, and exit 0 when both did (1
    /// otherwise). For health checks (compose, systemd).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    backhaul_common::runtime::fail("backhaul-agent", msg)
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

/// One backend ID and its URL, checked as --backend is.
fn service(id: &str, url: &str, what: &str) -> Result<Service, String> {
    let id_flag = if what == "--backend" {
        "--backend-id"
    } else {
        what
    };
    backhaul_common::api::validate_backend_id(id).map_err(|e| format!("{id_flag}: {e}"))?;
    let parsed = url::Url::parse(url).map_err(|e| format!("{what} {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "ws" | "wss" | "tcp") || parsed.host_str().is_none() {
        return Err(format!(
            "{what} {url:?} must be ws://, wss:// or tcp://HOST:PORT"
        ));
    }
    if parsed.scheme() == "tcp" {
        if parsed.port().is_none() {
            return Err(format!("{what} {url:?} needs a port: tcp://HOST:PORT"));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(format!(
                "{what} {url:?}: a tcp:// backend is HOST:PORT only, without a path or query"
            ));
        }
    }
    Ok(Service {
        id: id.to_string(),
        url: parsed,
    })
}

/// `ID=URL`, as --serve takes it.
fn parse_serve(entry: &str) -> Result<Service, String> {
    let (id, url) = entry.split_once('=').ok_or_else(|| {
        format!("--serve {entry:?} must be ID=URL, e.g. wiki=ws://127.0.0.1:9000")
    })?;
    service(id.trim(), url.trim(), "--serve")
}

/// Fails when two services share a backend ID.
fn distinct(services: &[Service]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for s in services {
        if !seen.insert(&s.id) {
            return Err(format!("backend ID {:?} is served twice", s.id));
        }
    }
    Ok(())
}

/// The services after a SIGHUP: `fixed` (from flags) and the `serve` list of the file.
fn reload_services(path: &std::path::Path, fixed: &[Service]) -> Result<Vec<Service>, String> {
    use clap::CommandFactory;
    let values = backhaul_common::config::read_file(&Args::command(), path)?;
    let mut services = fixed.to_vec();
    for value in values.into_iter().filter(|v| v.id == "serve") {
        for entry in &value.values {
            services.push(parse_serve(entry).map_err(|e| format!("{}: serve: {e}", value.at))?);
        }
    }
    distinct(&services)?;
    Ok(services)
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
    let mut services: Vec<Service> = Vec::new();
    if let (Some(id), Some(url)) = (&args.backend_id, &args.backend) {
        services.push(service(id, url, "--backend").unwrap_or_else(|e| fail(e)));
    }
    for entry in &args.serve {
        services.push(parse_serve(entry).unwrap_or_else(|e| fail(e)));
    }
    if let Err(e) = distinct(&services) {
        fail(e);
    }
    if services.is_empty() {
        fail("nothing to serve: give --backend-id and --backend, or --serve ID=URL (repeatable)");
    }
    if (args.expose || args.expose_port.is_some()) && services.len() > 1 {
        fail("--expose exposes one backend: run it with a single --backend-id/--backend");
    }
    if let Err(e) = backhaul_common::api::parse_allow(&args.expose_allow) {
        fail(format!("--expose-allow: {e}"));
    }
    if !args.expose_allow.is_empty() && !args.expose && args.expose_port.is_none() {
        fail("--expose-allow needs --expose or --expose-port".to_string());
    }
    let tls = args.ca_cert.as_deref().map(|ca| {
        backhaul_common::tls::client_config(Some(ca))
            .unwrap_or_else(|e| fail(format!("--ca-cert: {e:#}")))
    });
    let first = services[0].clone();
    let config = Config {
        relay,
        backend_id: first.id,
        backend: first.url,
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
        // Every backend at once, so that several fit in one health check's timeout.
        let checks = services
            .iter()
            .map(|s| backhaul_agent::check(config.serving(s)));
        let mut failed = false;
        for result in futures_util::future::join_all(checks).await {
            match result {
                Ok(what) => println!("backhaul-agent: check passed: {what}"),
                Err(why) => {
                    println!("backhaul-agent: check failed: {why}");
                    failed = true;
                }
            }
        }
        std::process::exit(i32::from(failed));
    }
    // A --config file's `serve` list is read again on SIGHUP, unless --serve gave it.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli_serve = backhaul_common::config::on_command_line(&argv, "serve");
    let reload = match (&args.runtime.config, cli_serve) {
        (Some(path), false) => {
            let path = path.clone();
            let fixed: Vec<Service> = services
                .iter()
                .filter(|s| Some(&s.id) == args.backend_id.as_ref())
                .cloned()
                .collect();
            Some(Box::new(move || reload_services(&path, &fixed)) as backhaul_agent::Reload)
        }
        _ => None,
    };
    let shutdown = telemetry::shutdown_on_signals();
    if let Some(addr) = &args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| fail(format!("--metrics-listen: could not listen on {addr}: {e}")));
        let bound = listener
            .local_addr()
            .unwrap_or_else(|e| fail(format!("--metrics-listen: {e}")));
        telemetry::announce(&format!(
            "backhaul-agent: metrics at http://{bound}/metrics"
        ));
        tokio::spawn(backhaul_agent::metrics::serve(listener, shutdown.clone()));
    }
    if let Err(e) = backhaul_agent::serve_all(config, services, shutdown, reload).await {
        eprintln!("backhaul-agent: {e:#}");
        std::process::exit(1);
    }
}
