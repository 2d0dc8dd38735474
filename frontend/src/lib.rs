//! backhaul-frontend: the public end of the stack. It accepts TCP connections (or uses
//! stdin/stdout, for `ssh -o ProxyCommand`) and carries each over its own WebSocket to the relay,
//! naming the backend it wants.
#![forbid(unsafe_code)]

use backhaul_common::bridge::{self, BridgeEnd, BridgeSummary, Wire};
use backhaul_common::dial::{dial, DialOptions};
use backhaul_common::ws::Role;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};
use url::Url;

/// How long shutdown waits for open connections.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The frontend's settings, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The WebSocket URL of the backend at the relay: `<relay>/b/<backend-id>`.
    pub url: Url,
    pub dial: DialOptions,
    pub max_connections: usize,
    /// How TCP bytes are framed (`--wire`).
    pub wire: Wire,
}

/// Builds `<relay>/b/<id>` from the relay's URL, keeping any base path and mapping http(s) to
/// ws(s). With Google's framing, the session asks for the path Google's tcp-bridge backend
/// serves, which the agent appends to its `--backend` URL.
pub fn session_url(relay: &str, backend_id: &str, wire: Wire) -> Result<Url, String> {
    let mut url = Url::parse(relay).map_err(|e| format!("{relay:?} is not a URL: {e}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(format!(
                "{relay:?} has scheme {other}:, expected ws, wss, http or https"
            ))
        }
    };
    if url.host_str().is_none() {
        return Err(format!("{relay:?} has no host"));
    }
    url.set_scheme(scheme)
        .map_err(|_| format!("cannot use {relay:?} as a WebSocket URL"))?;
    let mut path = format!("{}/b/{backend_id}", url.path().trim_end_matches('/'));
    if wire == Wire::GoogleTcpBridge {
        path.push_str(bridge::GOOGLE_TCPBRIDGE_PATH);
    }
    url.set_path(&path);
    url.set_query(None);
    Ok(url)
}

/// Dials the relay and carries one byte stream over it.
pub async fn carry<R, W>(config: &Config, read: R, write: W) -> anyhow::Result<BridgeSummary>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let dialed = dial(&config.url, &config.dial).await?;
    Ok(bridge::run(read, write, dialed.io, Role::Client, config.wire).await)
}

/// Accepts TCP connections on `listener` and carries each to the relay, until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let limit = Arc::new(Semaphore::new(config.max_connections));
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
        let span = tracing::info_span!("conn", client.addr = %peer);
        tracker.spawn(
            async move {
                let (mut r, mut w) = stream.into_split();
                match carry(&config, &mut r, &mut w).await {
                    Ok(summary) => log_summary(&summary),
                    Err(e) => warn!(
                        "could not open a session to {}: {e:#}; closing the client connection",
                        config.url
                    ),
                }
                // Close the client's connection only after logging why.
                drop((r, w));
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
        warn!("connections still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

/// Logs how a carried connection ended.
pub fn log_summary(summary: &BridgeSummary) {
    match &summary.end {
        BridgeEnd::Clean => info!(
            bytes.up = summary.to_ws,
            bytes.down = summary.from_ws,
            "connection ended"
        ),
        BridgeEnd::Closed(code, reason) => warn!(
            bytes.up = summary.to_ws,
            bytes.down = summary.from_ws,
            "connection closed by the far end (code {code}): {reason}"
        ),
        BridgeEnd::Failed(why) => warn!(
            bytes.up = summary.to_ws,
            bytes.down = summary.from_ws,
            "connection failed: {why}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_urls() {
        assert_eq!(
            session_url("http://r:8080", "db", Wire::Backhaul)
                .unwrap()
                .as_str(),
            "ws://r:8080/b/db"
        );
        assert_eq!(
            session_url("https://r/pre/", "db", Wire::Backhaul)
                .unwrap()
                .as_str(),
            "wss://r/pre/b/db"
        );
        assert_eq!(
            session_url("ws://r:1/?x=1", "db", Wire::Backhaul)
                .unwrap()
                .as_str(),
            "ws://r:1/b/db"
        );
        assert_eq!(
            session_url("http://r:8080", "db", Wire::GoogleTcpBridge)
                .unwrap()
                .as_str(),
            "ws://r:8080/b/db/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96"
        );
        assert!(session_url("ftp://r", "db", Wire::Backhaul).is_err());
        assert!(session_url("nonsense", "db", Wire::Backhaul).is_err());
    }
}
