//! Accepting TCP connections the same way in every server of the stack.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept, which is usually file-descriptor exhaustion: retrying at once
/// would spin.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection (with TCP_NODELAY set), or `None` once `shutdown` is cancelled.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    tracing::warn!(
                        "accept failed: {e}; retrying in {ACCEPT_RETRY:?} (check the open-files limit, ulimit -n)"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}
