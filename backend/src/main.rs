use backhaul_backend::http_bridge;
use backhaul_backend::{Config, Mode, Routes};
use backhaul_common::secret;
use backhaul_common::telemetry;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// backhaul-backend: a WebSocket server that turns each WebSocket session into a TCP connection
/// to the target service, or (--http-bridge) into HTTP POSTs to an application. The agent dials
/// it; clients never see it.
#[derive(Debug, Parser)]
#[command(version = backhaul_common::VERSION, after_help = "Example:
  backhaul-backend --listen 127.0.0.1:9000 --target 127.0.0.1:22

Every flag is also the variable BACKHAUL_BACKEND_<FLAG> and the key <flag> of the TOML file given
by --config; flags win, then variables, then the file. --config-example prints every key.
More: README.md and docs/ in the source tree.", about)]
struct Args {
    /// Address to listen on for WebSocket sessions. Whoever can reach it can open sessions to
    /// --target (or any --route): keep it on loopback or a private network only the agent can
    /// reach, and set --backend-secret where others can reach it too.
    #[arg(long, env = "BACKHAUL_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// The service to connect each session to, as HOST:PORT (not with --http-bridge).
    #[arg(
        long,
        env = "BACKHAUL_TARGET",
        required_unless_present_any = ["http_bridge", "route"],
        conflicts_with_all = ["http_bridge", "route"]
    )]
    target: Option<String>,
    /// Instead of --target, one backend for several services: a session whose agent dialed
    /// PATH goes to HOST:PORT (what a client adds to the path does not count). Repeat for
    /// more, e.g. --route /ssh=127.0.0.1:22 --route /wiki=127.0.0.1:8080, and serve each from
    /// the agent as its own backend ID (--serve ssh=ws://this-host:9000/ssh). Other paths get
    /// 404.
    #[arg(
        long,
        value_name = "PATH=HOST:PORT",
        env = "BACKHAUL_ROUTE",
        value_delimiter = ',',
        conflicts_with = "http_bridge"
    )]
    route: Vec<String>,
    /// Serve the WebSocket-to-HTTP bridge instead of a TCP target: each message a session
    /// sends is POSTed to the frame URL it named (`/connect?f=<frame URL>&d=<disconnect URL>`),
    /// with the session's callback URL in `x-ws-proxy-send`; the application POSTs to that URL
    /// to send the client a message.
    #[arg(long, env = "BACKHAUL_HTTP_BRIDGE")]
    http_bridge: bool,
    /// With --http-bridge: what callback URLs start with, as the application reaches this
    /// backend (e.g. http://10.0.0.5:9000). Default: http(s)://<--listen address>, which needs a
    /// specific listen address.
    #[arg(long, env = "BACKHAUL_BASE_URL", requires = "http_bridge")]
    base_url: Option<String>,
    /// With --http-bridge: a regular expression that a whole frame or disconnect URL must match
    /// (escape dots: 'http://app\.internal:8080/.*'). Repeat for more. None: every session is
    /// refused.
    #[arg(
        long,
        value_name = "REGEX",
        env = "BACKHAUL_ALLOWLIST",
        requires = "http_bridge"
    )]
    allowlist: Vec<String>,
    /// With --http-bridge: largest message either way, in KiB; it is held whole in memory. A
    /// larger one from the client closes the session with 1009; a larger callback gets 413.
    #[arg(long, env = "BACKHAUL_BRIDGE_MAX_MESSAGE_KIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_message_kib: u64,
    /// With --http-bridge: how long the application may take to answer one POST.
    #[arg(long, env = "BACKHAUL_POST_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    post_timeout_secs: u64,
    /// With --http-bridge: tries per POST before the session is closed with 1014 (no answer,
    /// 5xx, 408 and 429 are tried again, after 0.2 s, 0.4 s, 0.8 s, ...).
    #[arg(long, env = "BACKHAUL_POST_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10))]
    post_attempts: u32,
    /// With --http-bridge: extra CA certificate (PEM) to trust for https:// application URLs.
    #[arg(long, env = "BACKHAUL_APP_CA_CERT", requires = "http_bridge")]
    app_ca_cert: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain: the agent then dials wss://, and callback
    /// URLs are https://.
    #[arg(long, env = "BACKHAUL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, env = "BACKHAUL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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
    backhaul_common::runtime::fail("backhaul-backend", msg)
}

fn main() {
    let args: Args = backhaul_common::runtime::parse_args("backhaul-backend");
    backhaul_common::runtime::run("backhaul-backend", args.runtime.threads, serve(args));
}

async fn serve(mut args: Args) {
    telemetry::init("info", args.runtime.log_format);
    let secret = secret::load(
        "backend-secret",
        args.backend_secret.take(),
        args.backend_secret_file.as_deref(),
    )
    .unwrap_or_else(|e| fail(e));
    let origins = backhaul_backend::admission::OriginPolicy::parse(&args.allow_origin)
        .unwrap_or_else(|e| fail(e));
    if let Some(target) = &args.target {
        backhaul_backend::check_target("--target", target).unwrap_or_else(|e| fail(e));
    }
    let routes = Routes::parse(&args.route).unwrap_or_else(|e| fail(e));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            backhaul_common::tls::server_config(cert, key, &[b"http/1.1".to_vec()])
                .unwrap_or_else(|e| fail(format!("{e:#}"))),
        ),
        _ => None,
    };
    let allowlist = backhaul_backend::http_bridge::compile_allowlist(&args.allowlist)
        .unwrap_or_else(|e| fail(e));
    if args.max_sessions == 0 {
        fail("--max-sessions must be at least 1");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .unwrap_or_else(|e| fail(format!("could not listen on {}: {e}", args.listen)));
    let bound = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => fail(format!("listener has no address: {e}")),
    };
    let mode = match args.target.take() {
        Some(target) => Mode::Tcp { target },
        None if !args.route.is_empty() => {
            tracing::info!("routes by path: {}", routes.describe());
            Mode::Routes(routes)
        }
        None => Mode::HttpBridge(bridge_settings(&args, bound, tls.is_some(), allowlist)),
    };
    telemetry::announce_listening("backhaul-backend", bound);
    let config = Config {
        mode,
        tls,
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

/// The bridge's settings from the flags; exits with a clear message when they do not hold.
fn bridge_settings(
    args: &Args,
    bound: std::net::SocketAddr,
    tls: bool,
    allowlist: Vec<regex::Regex>,
) -> http_bridge::Settings {
    let scheme = if tls { "https" } else { "http" };
    let base_url = match &args.base_url {
        Some(raw) => {
            let url = url::Url::parse(raw).unwrap_or_else(|e| {
                fail(format!("--base-url {raw:?} is not a URL ({e}); give e.g. {scheme}://10.0.0.5:{}", bound.port()))
            });
            if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
                fail(format!("--base-url {raw:?} must be an http:// or https:// URL without a query"));
            }
            raw.trim_end_matches('/').to_string()
        }
        None if bound.ip().is_unspecified() => fail(format!(
            "--http-bridge needs --base-url when listening on {bound}: the address the application reaches this backend at, e.g. {scheme}://10.0.0.5:{}",
            bound.port()
        )),
        None => format!("{scheme}://{bound}"),
    };
    if allowlist.is_empty() {
        tracing::warn!("no --allowlist: every bridge session will be refused; add --allowlist with a regular expression for your application's URLs");
    }
    let tls_config = backhaul_common::tls::client_config(args.app_ca_cert.as_deref())
        .unwrap_or_else(|e| fail(format!("{e:#}")));
    let client = reqwest::Client::builder()
        // The application is inside the network: no proxy, and no redirect that could lead
        // outside --allowlist.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(args.post_timeout_secs))
        .tcp_nodelay(true)
        .user_agent(concat!("backhaul-backend/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured((*tls_config).clone())
        .build()
        .unwrap_or_else(|e| fail(format!("could not build the HTTP client: {e}")));
    http_bridge::Settings {
        base_url,
        allowlist,
        max_message: (args.max_message_kib * 1024) as usize,
        post_timeout: Duration::from_secs(args.post_timeout_secs),
        attempts: args.post_attempts,
        client,
    }
}
