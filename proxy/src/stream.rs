//! The relay's side of the streaming agent transports: a WebSocket, or an HTTP/2 request whose
//! body streams the agent's batches while the response body streams the relay's. Both carry the
//! same batches as long-poll, but many per connection and without waiting for acks, so a link's
//! throughput is no longer bounded by one batch per HTTP round trip.

use crate::hub::{Hub, HubError, InFlight, Link};
use backhaul_common::reliable::StreamCursor;
use backhaul_common::transport::{recv_within, write_batches, BatchRx, BatchTx};
use backhaul_common::wire::BatchReader;
use std::sync::Arc;
use tracing::{debug, warn};

/// Smallest batch a stream starts with, whatever the agent asks.
pub const MIN_BATCH: usize = 16 * 1024;

/// A stream the hub has accepted, with where it starts.
pub struct Start {
    pub link: Arc<Link>,
    pub guard: InFlight,
    pub generation: u64,
    /// The agent's ack: the first sequence number to send.
    pub from: u64,
    /// The first batch size (smaller after the agent saw breaks); see [`StreamCursor`].
    pub batch: usize,
}

/// Serves one stream of a link until it breaks, the agent ends it, or a newer poll or stream
/// takes over. The link itself outlives the stream: the agent reconnects, on this transport or
/// another, and carries on from the acks.
pub async fn serve<T: BatchTx, R: BatchRx>(
    hub: Arc<Hub>,
    start: Start,
    mut tx: T,
    mut rx: R,
    transport: &'static str,
) {
    let Start {
        link,
        guard: _guard,
        generation,
        from,
        batch,
    } = start;
    let silence = hub.cfg.poll_hold + hub.cfg.agent_timeout;
    debug!(link.id = link.short_id(), backend.id = %link.backend, "agent streaming over {transport}");

    let reader = async {
        loop {
            let batch = match recv_within(&mut rx, silence, "agent").await {
                Ok(b) => b,
                Err(why) => return why,
            };
            link.touch(0);
            let mut reader = BatchReader::from_message(batch);
            let delivered = hub.push_frames(&link, &mut reader, false).and_then(|_| {
                reader.finish().map(|_| ()).map_err(|e| HubError::Protocol {
                    link: link.short_id().to_string(),
                    what: e.to_string(),
                })
            });
            match delivered {
                Ok(()) => link.wake(), // our ack is due
                Err(e @ HubError::Protocol { .. }) => {
                    warn!("{e}");
                    hub.kill_link(&link, 1011, "the agent broke the protocol");
                    return e.to_string();
                }
                Err(e) => return e.to_string(),
            }
        }
    };

    let mut cursor = StreamCursor::new(from, batch, hub.cfg.max_batch_bytes);
    // The first batch goes at once: it tells the agent where to resume its own sending.
    let writer = write_batches(
        &mut tx,
        hub.cfg.poll_hold,
        true,
        || link.woken(),
        |force| {
            hub.claim_pending(&link);
            match hub.stream_next(&link, generation, &mut cursor, force) {
                Err(e) => Err(e.to_string()),
                Ok(None) => Err("a newer connection from the agent took over".to_string()),
                Ok(Some(next)) => Ok(next),
            }
        },
    );

    let why = tokio::select! {
        why = reader => why,
        why = writer => why,
    };
    debug!(link.id = link.short_id(), backend.id = %link.backend, "agent {transport} stream ended: {why}");
}
