//! backhaul-relay: the public HTTP(S) server of the stack. Frontends open WebSockets to it; agents
//! inside private networks collect those sessions over a WebSocket, an HTTP/2 stream or long-poll
//! HTTP requests, and exchange their messages in batches (see `docs/protocol.md`).
//!
//! - [`hub`]: which agents serve which backend, pending sessions, the links' reliable streams;
//! - [`http`]: the HTTP surface that translates requests into hub calls;
//! - [`stream`]: the relay's half of the streaming agent transports (WebSocket, HTTP/2).
#![forbid(unsafe_code)]

pub mod http;
pub mod hub;
pub mod stream;

use anyhow::Context;
use backhaul_common::transport::{H2_CONNECTION_WINDOW, H2_MAX_FRAME, H2_STREAM_WINDOW};
use hub::{Hub, HubConfig};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// How often quiet agent links are looked for.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for sessions and requests to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The relay's settings, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub hub: HubConfig,
    /// Bearer token agents must present; `None` lets any agent register.
    pub agent_token: Option<String>,
    /// Bearer token frontends (and other WebSocket clients of `/b/<id>`) must present; `None`
    /// lets anyone who reaches the relay open sessions.
    pub client_token: Option<String>,
    /// TLS for the listener; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    let ctx = Arc::new(http::Ctx {
        hub: hub.clone(),
        agent_token: config.agent_token.clone(),
        client_token: config.client_token.clone(),
        sessions: sessions.clone(),
        secure: config.tls.is_some(),
    });
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);

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
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // HTTP/2 carries agents' streaming links: windows big enough for a whole batch in flight.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONNECTION_WINDOW))
        .max_frame_size(Some(H2_MAX_FRAME))
        .max_send_buf_size(H2_STREAM_WINDOW as usize);
    let builder = Arc::new(builder);

    loop {
        let Some((stream, peer)) = backhaul_common::listen::accept(&listener, &shutdown).await
        else {
            break;
        };
        let ctx = ctx.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("conn", client.addr = %peer);
        connections.spawn(
            async move {
                let result = match tls {
                    None => serve(&builder, TokioIo::new(stream), ctx, peer, shutdown).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls_stream)) => {
                                serve(&builder, TokioIo::new(tls_stream), ctx, peer, shutdown).await
                            }
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
                if let Err(e) = result {
                    debug!("connection ended with an error: {e}");
                }
            }
            .instrument(span),
        );
    }

    info!("draining: closing agent links and sessions");
    reaper.abort();
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

async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    ctx: Arc<http::Ctx>,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| http::handle(ctx.clone(), peer, req));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Resolves the listener address from the configuration (kept here so tests and main agree).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen on {addr}"))
}
