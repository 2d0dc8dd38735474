//! backhaul-backend: a WebSocket server at the private end of the stack. Each WebSocket session
//! becomes one TCP connection to the target service (see `common::bridge` for the convention).
#![forbid(unsafe_code)]

use backhaul_common::bridge::{self, BridgeEnd};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
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
}

/// Serves WebSocket sessions on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_sessions));
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
        let config = config.clone();
        let span = tracing::info_span!("session", client.addr = %peer);
        tracker.spawn(
            async move {
                session(stream, &config).await;
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

// The handshake callback's error type is fixed by tungstenite; clippy's size lint does not apply.
#[allow(clippy::result_large_err)]
async fn session(stream: TcpStream, config: &Config) {
    let mut path = String::new();
    let callback = |req: &Request, resp: Response| {
        path = req.uri().to_string();
        Ok(resp)
    };
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(
            backhaul_common::lazy_read::LazyRead::new(stream),
            callback,
            Some(backhaul_common::ws_config()),
        ),
    )
    .await;
    let mut ws = match accepted {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!("WebSocket handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!("WebSocket handshake timed out");
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
            let frame = CloseFrame {
                code: CloseCode::Error,
                reason: reason.into(),
            };
            let _ = ws.send(Message::Close(Some(frame))).await;
            // Wait briefly for the close handshake so the reason reaches the client.
            let _ = tokio::time::timeout(bridge::CLOSE_WAIT, async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    debug!(path = %path, "connected to target {}", config.target);
    let (r, w) = target.into_split();
    let summary = bridge::run(r, w, ws).await;
    match &summary.end {
        BridgeEnd::Clean => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended"
        ),
        end => info!(
            bytes.to_target = summary.from_ws,
            bytes.from_target = summary.to_ws,
            "session ended early: {end:?}"
        ),
    }
}
