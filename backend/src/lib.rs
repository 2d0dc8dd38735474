//! backhaul-backend: a WebSocket server at the private end of the stack. Each WebSocket session
//! becomes one TCP connection to the target service (see `common::bridge` for the convention).
//! Handshakes are admitted by [`admission`]: the agent's secret, and the client's `Origin`.
#![forbid(unsafe_code)]

pub mod admission;

use admission::{OriginPolicy, Refusal};
use backhaul_common::bridge::{self, BridgeEnd, Wire};
use backhaul_common::refusal_log::RefusalLog;
use backhaul_common::secret::SecretHash;
use backhaul_common::ws::{switching_protocols, websocket_key, Role, WsReader, WsWriter};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// How long a client may take to complete the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open sessions.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The backend's settings, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service every session connects to, as `host:port`.
    pub target: String,
    pub connect_timeout: Duration,
    pub max_sessions: usize,
    /// The hash of `--backend-secret`: handshakes must present the secret in
    /// `X-Backhaul-Secret`. `None`: any handshake is served.
    pub secret: Option<SecretHash>,
    /// The `Origin`s a handshake may carry (`--allow-origin`); one without `Origin` is served.
    pub origins: OriginPolicy,
}

/// What the connections of one backend share.
struct Shared {
    config: Config,
    refusals: Arc<RefusalLog>,
}

/// Serves WebSocket sessions on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(config.max_sessions));
    let shared = Arc::new(Shared {
        config,
        refusals: RefusalLog::new("refused WebSocket handshakes"),
    });
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let Some((stream, peer)) = backhaul_common::listen::accept(&listener, &shutdown).await
        else {
            break;
        };
        let shared = shared.clone();
        let span = tracing::info_span!("session", client.addr = %peer);
        tracker.spawn(
            async move {
                session(stream, peer, &shared).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    tracker.close();
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("sessions still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

type Body = http_body_util::Full<bytes::Bytes>;

fn refusal(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(Body::from(format!("{msg}\n")));
    *resp.status_mut() = status;
    // One refused request per connection: a peer that tries again connects again.
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// Logs a refused handshake (at a bounded rate: see [`RefusalLog`]).
fn log_refusal(shared: &Arc<Shared>, peer: SocketAddr, req: &Request<Incoming>, why: &Refusal) {
    shared.refusals.log(|| {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .map(|v| format!(" (for client {})", admission::loggable(v.as_bytes())))
            .unwrap_or_default();
        format!(
            "refused a WebSocket handshake from {peer}{forwarded} with {}: {}",
            why.status(),
            why.explain()
        )
    });
}

/// Serves one connection: a WebSocket handshake (refusing anything else), then the session.
async fn session(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let config = &shared.config;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let service = hyper::service::service_fn(|mut req: Request<Incoming>| {
        let admitted = admission::admit(req.headers(), config.secret.as_ref(), &config.origins);
        let resp = match (websocket_key(&req), admitted) {
            (None, _) => refusal(
                StatusCode::UPGRADE_REQUIRED,
                "backhaul-backend carries WebSocket sessions; it is dialed by backhaul-agent",
            ),
            (Some(_), Err(why)) => {
                log_refusal(shared, peer, &req, &why);
                refusal(why.status(), why.body())
            }
            (Some(key), Ok(())) => {
                let upgrade = hyper::upgrade::on(&mut req);
                let path = req.uri().to_string();
                if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = tx.send((upgrade, path));
                }
                switching_protocols(&key, None)
            }
        };
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!("WebSocket handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!("WebSocket handshake timed out");
            return;
        }
    }
    let Ok((upgrade, path)) = rx.await else {
        return; // the connection ended without asking for a WebSocket
    };
    let ws = match upgrade.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            debug!("WebSocket upgrade failed: {e}");
            return;
        }
    };
    let target = match tokio::time::timeout(
        config.connect_timeout,
        TcpStream::connect(&config.target),
    )
    .await
    {
        Ok(Ok(t)) => t,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {:?}", config.connect_timeout),
            };
            let reason = format!(
                "backend could not connect to target {}: {why}",
                config.target
            );
            warn!(path = %path, "{reason}");
            let (r, w) = tokio::io::split(ws);
            let mut ws_tx = WsWriter::new(w, Role::Server);
            let _ = ws_tx.close(Some((1011, &reason))).await;
            // Wait briefly for the close handshake so the reason reaches the client.
            WsReader::new(r, Role::Server, 0)
                .drain(bridge::CLOSE_WAIT)
                .await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    debug!(path = %path, "connected to target {}", config.target);

    let (r, w) = target.into_split();
    // Google's tcp-bridge frontend asks for its fixed path: answer in its framing.
    let path_only = path.split('?').next().unwrap_or_default();
    let wire = if path_only.ends_with(bridge::GOOGLE_TCPBRIDGE_PATH) {
        Wire::GoogleTcpBridge
    } else {
        Wire::Backhaul
    };
    let summary = bridge::run(r, w, ws, Role::Server, wire).await;
    match &summary.end {
        BridgeEnd::Clean => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended"
        ),
        end => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended early: {end}"
        ),
    }
}
