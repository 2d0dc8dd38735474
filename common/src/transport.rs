//! Message streams between agent and relay. The long-poll transport carries one batch per HTTP
//! body; the streaming transports (a WebSocket, or an HTTP/2 request and response whose bodies
//! stay open) carry a sequence of batches in one connection. This module gives both ends of a
//! streaming transport the same two halves to drive: [`BatchTx`] sends one batch, [`BatchRx`]
//! yields the next one. Sequence numbers and acks inside the batches are what keep data whole
//! across reconnects and transport changes (see `reliable`); these halves only carry bytes.
//!
//! On HTTP/2 a body is a byte stream, so each batch is preceded by its length:
//! `len:u32 (big-endian) | batch[len]`.

use crate::reliable::StreamNext;
use crate::wire::Batch;
use crate::ws::{Event, Role, WsError, WsReader, WsWriter};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::futures::Notified;
use tokio::sync::mpsc;

/// The transports an agent link can use (docs/protocol.md "Transports"), as the agent chooses
/// them and the relay counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket = 1,
    Http2 = 2,
    LongPoll = 3,
}

impl Transport {
    /// Its name in flags, logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Http2 => "http2",
            Transport::LongPoll => "longpoll",
        }
    }

    /// The transport whose `as u8` is `n`, if any (for keeping one in an atomic).
    pub fn from_u8(n: u8) -> Option<Self> {
        [Transport::WebSocket, Transport::Http2, Transport::LongPoll]
            .into_iter()
            .find(|t| *t as u8 == n)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
use tokio::time::Instant;

/// Bytes of the length prefix before each batch on an HTTP/2 body.
pub const LEN_PREFIX: usize = 4;

/// HTTP/2 flow-control windows and frame size, for both the relay and the agent: big enough
/// that a whole batch is in flight without waiting for WINDOW_UPDATEs.
pub const H2_STREAM_WINDOW: u32 = 4 << 20;
pub const H2_CONNECTION_WINDOW: u32 = 8 << 20;
pub const H2_MAX_FRAME: u32 = 256 << 10;

/// How long an ack with nothing else to send may wait for a batch to ride on.
pub const ACK_DELAY: Duration = Duration::from_millis(2);

/// Largest batch message accepted on a link whose batch size is `max_batch`: a batch may exceed
/// its target by one frame, and the frame headers come on top.
pub fn max_message(max_batch: usize) -> usize {
    max_batch * 2 + 64 * 1024
}

/// Why a stream transport stopped carrying batches.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("peer sent {0} bytes in one batch, over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("peer sent a text message; agent links carry binary batches only")]
    Text,
}

/// Sends whole batches.
pub trait BatchTx: Send {
    fn send(&mut self, batch: Batch) -> impl Future<Output = Result<(), StreamError>> + Send;
}

/// Receives whole batches; `None` when the peer ended the stream cleanly.
pub trait BatchRx: Send {
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
}

/// Splits the connection of an upgraded WebSocket into batch halves, one batch per message.
/// `role` is our end; `max_batch` the link's batch size, which bounds what is accepted.
///
/// The link speaks WebSocket through [`crate::ws`]: a batch goes out as one frame, written from
/// its parts with vectored writes (a client masks them into one buffer), and comes in read
/// whole into one buffer whose frames are decoded in place, so a byte is copied at most once
/// in user space on the way through. Pings are not answered: neither end sends them (the
/// link's heartbeats are batches), and a peer that pings is not one of ours.
pub fn ws_halves<S>(io: S, role: Role, max_batch: usize) -> (WsTx<WriteHalf<S>>, WsRx<ReadHalf<S>>)
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (r, w) = tokio::io::split(io);
    (
        WsTx(WsWriter::new(w, role)),
        WsRx {
            ws: WsReader::new(r, role, max_message(max_batch) as u64),
            joined: None,
        },
    )
}

pub struct WsTx<W>(WsWriter<W>);

pub struct WsRx<R> {
    ws: WsReader<R>,
    /// A message that came in several frames (an intermediary may fragment), joined.
    joined: Option<BytesMut>,
}

impl<W: AsyncWrite + Unpin + Send> BatchTx for WsTx<W> {
    async fn send(&mut self, batch: Batch) -> Result<(), StreamError> {
        self.0
            .binary_parts(batch.parts())
            .await
            .map_err(|e| StreamError::Lost(e.to_string()))
    }
}

impl<R: AsyncRead + Unpin + Send> BatchRx for WsRx<R> {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            match self.ws.next_whole_frame().await {
                Ok(Event::Data { text: true, .. }) => return Err(StreamError::Text),
                Ok(Event::Data { fin, payload, .. }) => match (fin, self.joined.take()) {
                    (true, None) => return Ok(Some(payload)),
                    (true, Some(mut j)) => {
                        j.extend_from_slice(&payload);
                        return Ok(Some(j.freeze()));
                    }
                    (false, j) => {
                        let mut j = j.unwrap_or_default();
                        j.extend_from_slice(&payload);
                        self.joined = Some(j);
                    }
                },
                Ok(Event::Close(_)) => return Ok(None),
                Ok(Event::Ping(_) | Event::Pong(_)) => continue,
                Err(WsError::TooBig { limit }) => {
                    return Err(StreamError::Lost(format!(
                        "peer sent a message over the limit of {limit} bytes"
                    )))
                }
                Err(WsError::Eof) => {
                    return Err(StreamError::Lost(
                        "the connection ended without a WebSocket close".into(),
                    ))
                }
                Err(e) => return Err(StreamError::Lost(e.to_string())),
            }
        }
    }
}

/// The sending half of an HTTP/2 body: batches go, length-prefixed, into a channel that the
/// HTTP stack drains into DATA frames, a batch's parts as they are.
pub struct ChannelTx(mpsc::Sender<Batch>);

impl ChannelTx {
    /// A sender and the stream of body chunks it feeds, for the HTTP stack to drain.
    pub fn new() -> (Self, impl Stream<Item = Bytes> + Send + 'static) {
        // Four batches queued at most, as many as the length prefixes and batches of before.
        let (tx, rx) = mpsc::channel::<Batch>(4);
        let chunks = futures_util::stream::unfold(
            (rx, std::collections::VecDeque::new()),
            |(mut rx, mut parts)| async move {
                if parts.is_empty() {
                    let batch = rx.recv().await?;
                    let len = (batch.len() as u32).to_be_bytes();
                    parts.push_back(Bytes::copy_from_slice(&len));
                    parts.extend(batch.into_parts());
                }
                let part = parts.pop_front()?;
                Some((part, (rx, parts)))
            },
        );
        (Self(tx), chunks)
    }
}

impl BatchTx for ChannelTx {
    async fn send(&mut self, batch: Batch) -> Result<(), StreamError> {
        self.0
            .send(batch)
            .await
            .map_err(|_| StreamError::Lost("the HTTP/2 stream was closed".into()))
    }
}

/// Cuts a byte stream (an HTTP/2 body) back into length-prefixed batches.
#[derive(Debug)]
pub struct Splitter {
    buf: BytesMut,
    max: usize,
}

impl Splitter {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole batch, or `None` until more bytes arrive.
    pub fn next_batch(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(StreamError::TooLarge(len, self.max));
        }
        if self.buf.len() < LEN_PREFIX + len {
            self.buf.reserve(LEN_PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes of a batch begun but not finished.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The receiving half of an HTTP/2 body, over any source of body chunks.
pub struct ChunkRx<F> {
    next_chunk: F,
    splitter: Splitter,
}

/// Something that yields body chunks: `Ok(None)` at the end of the body.
pub trait ChunkSource: Send {
    fn chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl<F: ChunkSource> ChunkRx<F> {
    pub fn new(source: F, max_batch: usize) -> Self {
        Self {
            next_chunk: source,
            splitter: Splitter::new(max_message(max_batch)),
        }
    }
}

impl<F: ChunkSource> BatchRx for ChunkRx<F> {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            if let Some(b) = self.splitter.next_batch()? {
                return Ok(Some(b));
            }
            match self.next_chunk.chunk().await {
                Ok(Some(c)) => self.splitter.push(&c),
                Ok(None) if self.splitter.pending() == 0 => return Ok(None),
                Ok(None) => {
                    return Err(StreamError::Lost(format!(
                        "body ended inside a batch ({} stray bytes)",
                        self.splitter.pending()
                    )))
                }
                Err(e) => return Err(StreamError::Lost(e)),
            }
        }
    }
}

/// The next batch from `rx`, or why there is none: the `peer` was silent for `silence`, the
/// connection broke, or the peer ended the stream.
pub async fn recv_within<R: BatchRx>(
    rx: &mut R,
    silence: Duration,
    peer: &str,
) -> Result<Bytes, String> {
    match tokio::time::timeout(silence, rx.recv()).await {
        Err(_) => Err(format!("no word from the {peer} in {silence:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Err(format!("the {peer} ended the stream")),
        Ok(Ok(Some(b))) => Ok(b),
    }
}

/// Sends a stream's batches until sending fails or `next` gives a reason to stop; returns it.
///
/// `next(force)` takes the next step from the caller's send buffer (see
/// [`crate::reliable::StreamCursor`]); `force` is set when a heartbeat is due (`heartbeat` after
/// the last batch, or at once for the first with `first_at_once`) or an ack has waited
/// [`ACK_DELAY`]. Between steps it waits for `woken()`, which is created before each step so no
/// wake-up is lost.
pub async fn write_batches<'a, T, W, N>(
    tx: &mut T,
    heartbeat: Duration,
    first_at_once: bool,
    woken: W,
    mut next: N,
) -> String
where
    T: BatchTx,
    W: Fn() -> Notified<'a>,
    N: FnMut(bool) -> Result<StreamNext, String>,
{
    let mut last_sent = (!first_at_once).then(Instant::now);
    let mut ack_due: Option<Instant> = None;
    loop {
        let notified = woken();
        let now = Instant::now();
        let heartbeat_due = last_sent.is_none_or(|t| now >= t + heartbeat);
        let force = heartbeat_due || ack_due.is_some_and(|t| now >= t);
        match next(force) {
            Err(why) => return why,
            Ok(StreamNext::Batch(b)) => {
                if let Err(e) = tx.send(b).await {
                    return e.to_string();
                }
                last_sent = Some(Instant::now());
                ack_due = None;
                continue;
            }
            Ok(StreamNext::AckDue) => {
                ack_due.get_or_insert(now + ACK_DELAY);
            }
            Ok(StreamNext::Idle) => {}
        }
        let mut wake_at = last_sent.map_or(now, |t| t + heartbeat);
        if let Some(t) = ack_due {
            wake_at = wake_at.min(t);
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_reassembles_across_chunks_and_bounds_size() {
        let mut wire = Vec::new();
        for msg in [&b"hello"[..], b"", b"world!"] {
            wire.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            wire.extend_from_slice(msg);
        }
        let mut s = Splitter::new(16);
        let mut got = Vec::new();
        for b in wire.chunks(3) {
            s.push(b);
            while let Some(m) = s.next_batch().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![&b"hello"[..], b"", b"world!"]);
        assert_eq!(s.pending(), 0);

        let mut s = Splitter::new(16);
        s.push(&17u32.to_be_bytes());
        assert!(matches!(s.next_batch(), Err(StreamError::TooLarge(17, 16))));
    }
}
