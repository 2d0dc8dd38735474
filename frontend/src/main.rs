use backhaul_common::bridge::Wire;
use backhaul_common::dial::{bearer_headers, DialOptions};
use backhaul_common::secret::{self, Secret};
use backhaul_common::telemetry;
use backhaul_frontend::Config;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// backhaul-frontend: accepts TCP connections (or uses stdin/stdout with --stdio) and carries each
/// over a WebSocket to the relay, to the backend named by --backend-id.
///
/// With --stdio it works as an SSH ProxyCommand:
///   ssh -o ProxyCommand='backhaul-frontend --stdio --relay https://relay --backend-id ssh' host
#[derive(Debug, Parser)]
#[command(version = backhaul_common::VERSION, after_help = "Example:
  backhaul-frontend --listen 127.0.0.1:2222 --relay http://relay.example:8080 --backend-id office-ssh

Every flag is also the variable BACKHAUL_FRONTEND_<FLAG> and the key <flag> of the TOML file given
by --config; flags win, then variables, then the file. --config-example prints every key.
More: README.md and docs/ in the source tree.", about, verbatim_doc_comment)]
struct Args {
    /// Address to accept TCP connections on.
    #[arg(
        long,
        env = "BACKHAUL_LISTEN",
        required_unless_present = "stdio",
        conflicts_with = "stdio"
    )]
    listen: Option<String>,
    /// Carry stdin/stdout as one connection instead of listening.
    #[arg(long, env = "BACKHAUL_STDIO")]
    stdio: bool,
    /// The relay's URL (ws://, wss://, http:// or https://).
    #[arg(long, env = "BACKHAUL_RELAY")]
    relay: String,
    /// The backend to reach, as the agent names it with its --backend-id.
    #[arg(long, env = "BACKHAUL_BACKEND_ID")]
    backend_id: String,
    /// Token the relay requires from frontends (its --client-token). A flag shows in `ps`:
    /// prefer the environment or --client-token-file. Refused when empty.
    #[arg(long, env = "BACKHAUL_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// File holding the client token on one line, instead of --client-token.
    #[arg(long, env = "BACKHAUL_CLIENT_TOKEN_FILE")]
    client_token_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for a wss:// relay.
    #[arg(long, env = "BACKHAUL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// How long to wait for the relay to accept a WebSocket.
    #[arg(long, env = "BACKHAUL_CONNECT_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    connect_timeout_secs: u64,
    /// How TCP bytes travel in WebSocket messages: backhaul (binary messages, half-close
    /// carried) or google-tcpbridge (hex in text messages at Google's fixed path, to reach a
    /// backend of Google's inverting-proxy tcp-bridge through the relay; no half-close).
    #[arg(long, env = "BACKHAUL_WIRE", default_value = "backhaul")]
    wire: WireArg,
    /// Most connections carried at once; further clients wait to be accepted.
    #[arg(long, env = "BACKHAUL_MAX_CONNECTIONS", default_value_t = 20000)]
    max_connections: usize,
    #[command(flatten)]
    runtime: backhaul_common::runtime::RuntimeArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum WireArg {
    Backhaul,
    GoogleTcpbridge,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    backhaul_common::runtime::fail("backhaul-frontend", msg)
}

/// The secret of `--<flag>` or `--<flag>-file`, if given; exits when it is empty, given twice,
/// unreadable, or not header text.
fn load_secret(flag: &str, value: Option<String>, file: Option<&Path>) -> Option<Secret> {
    secret::load(flag, value, file).unwrap_or_else(|e| fail(e))
}

fn main() {
    let args: Args = backhaul_common::runtime::parse_args("backhaul-frontend");
    backhaul_common::runtime::run("backhaul-frontend", args.runtime.threads, serve(args));
}

async fn serve(args: Args) {
    telemetry::init(
        if args.stdio { "warn" } else { "info" },
        args.runtime.log_format,
    );
    let client_token = load_secret(
        "client-token",
        args.client_token,
        args.client_token_file.as_deref(),
    );
    if let Err(e) = backhaul_common::api::validate_backend_id(&args.backend_id) {
        fail(format!("--backend-id: {e}"));
    }
    let wire = match args.wire {
        WireArg::Backhaul => Wire::Backhaul,
        WireArg::GoogleTcpbridge => Wire::GoogleTcpBridge,
    };
    let url = backhaul_frontend::session_url(&args.relay, &args.backend_id, wire)
        .unwrap_or_else(|e| fail(format!("--relay: {e}")));
    let tls = args.ca_cert.as_deref().map(|ca| {
        backhaul_common::tls::client_config(Some(ca))
            .unwrap_or_else(|e| fail(format!("--ca-cert: {e:#}")))
    });
    if args.max_connections == 0 {
        fail("--max-connections must be at least 1");
    }
    let config = Config {
        url,
        dial: DialOptions {
            timeout: Duration::from_secs(args.connect_timeout_secs),
            tls,
            headers: bearer_headers(client_token.as_ref()),
            ..DialOptions::default()
        },
        max_connections: args.max_connections,
        wire,
    };

    if args.stdio {
        // Exit as soon as the session ends: tokio reads stdin on a blocking thread that the
        // runtime would otherwise wait for, and ssh may keep our stdin open until we go.
        let code = match backhaul_frontend::carry(&config, tokio::io::stdin(), tokio::io::stdout())
            .await
        {
            Ok(summary) => {
                backhaul_frontend::log_summary(&summary);
                i32::from(!matches!(
                    summary.end,
                    backhaul_common::bridge::BridgeEnd::Clean
                ))
            }
            Err(e) => {
                eprintln!(
                    "backhaul-frontend: could not open a session to {}: {e:#}",
                    config.url
                );
                1
            }
        };
        std::process::exit(code);
    }

    let listen = args.listen.unwrap_or_default();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| fail(format!("could not listen on {listen}: {e}")));
    match listener.local_addr() {
        Ok(addr) => telemetry::announce_listening("backhaul-frontend", addr),
        Err(e) => fail(format!("listener has no address: {e}")),
    }
    let shutdown = telemetry::shutdown_on_signals();
    if let Err(e) = backhaul_frontend::run(config, listener, shutdown).await {
        eprintln!("backhaul-frontend: {e:#}");
        std::process::exit(1);
    }
}
