//! backhaul-relay: the public HTTP(S) server of the stack. Frontends open WebSockets to it; agents
//! inside private networks collect those sessions over a WebSocket, an HTTP/2 stream or long-poll
//! HTTP requests, and exchange their messages in batches (see `docs/protocol.md`).
//!
//! - [`auth`]: who may serve and reach which backend (credentials file, shared tokens, open);
//! - [`conn`]: connection caps, the first-request deadline and the idle timeout;
//! - [`expose`]: backends exposed on public TCP ports of their own, for plain TCP clients;
//! - [`hub`]: which agents serve which backend, pending sessions, the links' reliable streams;
//! - [`http`]: the HTTP surface that translates requests into hub calls;
//! - [`metrics`], [`status`]: what the relay counts, as `/metrics` and as the `/status` page;
//! - [`stream`]: the relay's half of the streaming agent transports (WebSocket, HTTP/2).
#![forbid(unsafe_code)]

pub mod auth;
pub mod conn;
pub mod expose;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod status;
pub mod stream;

use anyhow::Context;
use auth::{Auth, Policy};
use backhaul_common::transport::{H2_CONNECTION_WINDOW, H2_MAX_FRAME, H2_STREAM_WINDOW};
use conn::{Activity, ConnConfig, ConnLimits, Quiet};
use http_body_util::BodyExt;
use hub::{Hub, HubConfig};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

/// How often quiet agent links are looked for.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a client may take to send a request's headers (after the first request, whose
/// deadline is [`ConnConfig::first_request_timeout`]).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings on a connection quiet for this long; a peer that does not answer within
/// [`H2_KEEPALIVE_TIMEOUT`] is gone.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent HTTP/2 streams per connection (an agent needs a handful).
const H2_MAX_STREAMS: u32 = 128;
/// Largest HTTP/2 header block accepted.
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// How long a connection closed for idleness gets to say goodbye (an HTTP/2 GOAWAY); a partial
/// request it had started is cut after this.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long shutdown waits for sessions and requests to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The relay's settings, already validated.
#[derive(Debug)]
pub struct Config {
    pub hub: HubConfig,
    /// Who may register agents and open sessions.
    pub policy: Policy,
    pub conn: ConnConfig,
    /// TLS for the listener; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Exposed ports; `None`: agents may not ask for one.
    pub expose: Option<expose::ExposeConfig>,
    /// Who may read `/metrics` and `/status`.
    pub admin: AdminAccess,
}

/// Who may read `/metrics` and `/status`.
#[derive(Debug, Clone, Copy, Default)]
pub enum AdminAccess {
    /// Nobody (neither `--admin-token` nor `--admin-loopback`).
    #[default]
    Off,
    /// Requests from loopback (`--admin-loopback`): only safe when nothing on the relay's host
    /// forwards outside traffic to it.
    Loopback,
    /// Requests carrying the token with this hash (`--admin-token[-file]`).
    Token(backhaul_common::secret::SecretHash),
}

/// Serves the relay on `listener` until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let hub = Arc::new(Hub::new(config.hub.clone()));
    let sessions = TaskTracker::new();
    let connections = TaskTracker::new();
    let auth = Arc::new(Auth::new(config.policy));
    let limits = ConnLimits::new(config.conn.clone());
    let ctx = Arc::new(http::Ctx {
        hub: hub.clone(),
        auth: auth.clone(),
        body_timeout: config.conn.first_request_timeout,
        sessions: sessions.clone(),
        secure: config.tls.is_some(),
        exposer: config
            .expose
            .clone()
            .map(|c| expose::Exposer::new(c, shutdown.clone())),
        admin: config.admin,
        draining: shutdown.clone(),
    });
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);

    let reloader = tokio::spawn(reload_on_hangup(
        auth.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let reaper = {
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => hub.reap(),
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // A client that ends its side after the request still gets the answer (`nc -N`,
        // scripts); the deadlines bound how long a half-closed connection can stay.
        .half_close(true);
    // HTTP/2 carries agents' streaming links: windows big enough for a whole batch in flight.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONNECTION_WINDOW))
        .max_frame_size(Some(H2_MAX_FRAME))
        .max_send_buf_size(H2_STREAM_WINDOW as usize)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);

    loop {
        let Some((stream, peer)) = backhaul_common::listen::accept(&listener, &shutdown).await
        else {
            break;
        };
        let slot = match limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: a refused client gets a reset, not a slot in the backlog.
                drop(stream);
                ctx.refuse(
                    metrics::Refused::ConnectionLimit,
                    format!("refused a connection from {peer}: {why}"),
                );
                continue;
            }
        };
        let ctx = ctx.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let limits = limits.clone();
        let span = tracing::debug_span!("conn", client.addr = %peer);
        connections.spawn(
            async move {
                let _slot = slot;
                let cfg = limits.config();
                let deadline = tokio::time::Instant::now() + cfg.first_request_timeout;
                let io = match tls {
                    None => Either::Left(stream),
                    Some(acceptor) => {
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => Either::Right(tls_stream),
                            Ok(Err(e)) => {
                                debug!("TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let io = TokioIo::new(io);
                let result = serve(&builder, io, ctx, peer, cfg, deadline, shutdown).await;
                if let Err(e) = result {
                    debug!("connection ended with an error: {e}");
                }
            }
            .instrument(span),
        );
    }

    info!("draining: closing agent links and sessions");
    reaper.abort();
    reloader.abort();
    hub.shutdown();
    connections.close();
    sessions.close();
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        connections.wait().await;
        sessions.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!("some connections were still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

/// Serves one connection until it ends, the relay shuts down, or its watchdog finds it quiet: no
/// first request by `first_deadline`, or no request in flight for the idle timeout.
async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    ctx: Arc<http::Ctx>,
    peer: std::net::SocketAddr,
    cfg: &ConnConfig,
    first_deadline: tokio::time::Instant,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let busy = activity.busy();
            let ctx = ctx.clone();
            async move {
                let resp = http::handle(ctx, peer, req).await?;
                // The request stays in flight until its response body is done: a streaming link's
                // body lives as long as the link.
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    body.map_frame(move |f| {
                        let _in_flight = &busy;
                        f
                    })
                    .boxed()
                }))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let first = first_deadline.saturating_duration_since(tokio::time::Instant::now());
    tokio::select! {
        r = conn.as_mut() => r,
        quiet = activity.until_idle(first, cfg.idle_timeout) => {
            debug!("closing a quiet connection: {quiet:?}");
            match quiet {
                // Nothing was served: no goodbye is owed. (A graceful shutdown would wait for a
                // half-sent first request to finish, which is what a slow-loris never does.)
                Quiet::NoFirstRequest => Ok(()),
                // Nothing in flight: HTTP/2 peers get a GOAWAY, idle HTTP/1 closes at once.
                Quiet::Idle => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                }
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Reads the credentials file again on each SIGHUP; links whose credential is gone are closed.
async fn reload_on_hangup(auth: Arc<Auth>, hub: Arc<Hub>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot listen for SIGHUP, so credentials cannot be reloaded: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            r = hangups.recv() => if r.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        match auth.reload() {
            Ok(None) => info!("SIGHUP: no --credentials file, nothing to reload"),
            Ok(Some(policy)) => {
                let closed =
                    hub.revoke(|backend, credential| policy.still_allows(backend, credential));
                let backends = match &*policy {
                    Policy::PerBackend { backends, .. } => backends.len(),
                    _ => 0,
                };
                info!(backends, links_closed = closed, "credentials reloaded");
            }
            Err(e) => error!("credentials NOT reloaded, the previous ones stay in force: {e}"),
        }
    }
}

/// Resolves the listener address from the configuration (kept here so tests and main agree).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on {addr}"))
}
