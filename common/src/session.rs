//! One session between a WebSocket and the agent link, with per-session flow control. The relay
//! runs it between a frontend's WebSocket and its link to an agent; the agent runs it between
//! its link and the backend's WebSocket. The same code on both sides keeps the two ends honest.
//!
//! Flow control works like HTTP/2's: each direction of a session has a window of `window` bytes
//! of DATA. A sender spends window as it sends DATA and waits when none is left; the receiver
//! gives it back with WINDOW frames as its writer takes the data off the queue. So a slow reader
//! stops its writer at the other end of the stack, and no buffer anywhere grows past the window
//! (plus one message being reassembled, at most [`crate::MAX_MESSAGE_SIZE`]).

use crate::wire::{Frame, Kind, MAX_CHUNK};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// How long to wait for the WebSocket peer's answer after we send a Close.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Where a session's outgoing frames go: the link's send queue.
pub trait FrameSink: Send + Sync + 'static {
    /// Queues a frame for the peer. Never blocks: flow control bounds what a session queues.
    fn send(&self, frame: Frame);
}

/// A frame from the link broke the session's rules; the session must be dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionViolation {
    #[error("peer sent {queued} bytes of DATA against a window of {window}")]
    WindowExceeded { queued: usize, window: u32 },
    #[error("peer granted {credit} bytes of window, more than it could have consumed")]
    CreditOverflow { credit: u32 },
    #[error("malformed {0:?} frame")]
    Malformed(Kind),
}

/// The link's side of a session: where the link hands the frames it receives for it.
#[derive(Debug)]
pub struct SessionHandle {
    tx: mpsc::UnboundedSender<Frame>,
    credits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    window: u32,
    /// Told about the session's first OPENED or CLOSE, for a side that waits for the far end
    /// to accept before it answers its own client (the relay, when subprotocols are offered).
    accepted: std::sync::Mutex<Option<oneshot::Sender<Frame>>>,
}

/// The pump's side of a session, consumed by [`pump`].
#[derive(Debug)]
pub struct SessionPeer {
    id: u32,
    rx: mpsc::UnboundedReceiver<Frame>,
    credits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    window: u32,
}

/// Creates the two sides of session `id` with `window` bytes of flow-control window each way.
pub fn new_session(id: u32, window: u32) -> (SessionHandle, SessionPeer) {
    // Unbounded in type only: DATA is bounded by the window (checked in `deliver`), and the
    // control frames a well-behaved peer sends are bounded by the DATA they answer.
    let (tx, rx) = mpsc::unbounded_channel();
    let credits = Arc::new(Semaphore::new(window as usize));
    let queued = Arc::new(AtomicUsize::new(0));
    (
        SessionHandle {
            tx,
            credits: credits.clone(),
            queued: queued.clone(),
            window,
            accepted: std::sync::Mutex::new(None),
        },
        SessionPeer {
            id,
            rx,
            credits,
            queued,
            window,
        },
    )
}

impl SessionHandle {
    /// Hands a frame received from the link to the session. An error means the peer broke flow
    /// control or sent garbage: drop the session (and tell the peer with an abort).
    pub fn deliver(&self, frame: Frame) -> Result<(), SessionViolation> {
        if matches!(frame.kind, Kind::Opened | Kind::Close) {
            let waiter = self
                .accepted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(w) = waiter {
                let _ = w.send(frame.clone());
            }
        }
        match frame.kind {
            Kind::Window => {
                let credit = frame
                    .window_credit()
                    .map_err(|_| SessionViolation::Malformed(Kind::Window))?;
                if self.credits.available_permits() + credit as usize > self.window as usize {
                    return Err(SessionViolation::CreditOverflow { credit });
                }
                self.credits.add_permits(credit as usize);
                Ok(())
            }
            Kind::Data => {
                let len = frame.payload.len();
                let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
                if queued > self.window as usize {
                    return Err(SessionViolation::WindowExceeded {
                        queued,
                        window: self.window,
                    });
                }
                let _ = self.tx.send(frame);
                Ok(())
            }
            _ => {
                // A send error means the pump has finished; late frames are dropped.
                let _ = self.tx.send(frame);
                Ok(())
            }
        }
    }

    /// Returns a receiver for the session's first OPENED or CLOSE frame from the far end.
    pub fn on_accept(&self) -> oneshot::Receiver<Frame> {
        let (tx, rx) = oneshot::channel();
        *self.accepted.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Ends the session from the link's side: the pump closes its WebSocket with this frame
    /// (a CLOSE or an abort) and stops waiting for window.
    pub fn terminate(&self, frame: Frame) {
        let _ = self.tx.send(frame);
        self.credits.close();
    }

    /// Whether the pump has finished.
    pub fn is_finished(&self) -> bool {
        self.tx.is_closed()
    }
}

/// How a session ended, for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Our WebSocket peer closed (code, reason).
    LocalClose(Option<(u16, String)>),
    /// The link's peer closed (code, reason) and we passed it on.
    RemoteClose(Option<(u16, String)>),
    /// Our WebSocket broke without a close handshake.
    LocalLost(String),
    /// The link's peer reported its side lost, or the link itself went away.
    RemoteLost(String),
}

/// Byte counts and the ending of a session.
#[derive(Debug, Clone)]
pub struct Summary {
    pub id: u32,
    /// DATA bytes from our WebSocket into the link.
    pub sent: u64,
    /// DATA bytes from the link out to our WebSocket.
    pub received: u64,
    pub ending: Ending,
}

/// Runs one session until either side ends it. Frames for the peer go to `sink`.
pub async fn pump<S>(ws: WebSocketStream<S>, peer: SessionPeer, sink: Arc<dyn FrameSink>) -> Summary
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let SessionPeer {
        id,
        mut rx,
        credits,
        queued,
        window,
    } = peer;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let mut sent = 0u64;
    let mut received = 0u64;

    let reader = async {
        loop {
            let msg = match ws_rx.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    sink.send(Frame::abort(id, "connection lost"));
                    return Ending::LocalLost(e.to_string());
                }
                None => {
                    sink.send(Frame::abort(id, "connection lost"));
                    return Ending::LocalLost("connection ended without a close handshake".into());
                }
            };
            let (text, payload) = match msg {
                Message::Binary(b) => (false, b),
                Message::Text(t) => (true, Bytes::from(t)),
                Message::Ping(p) => {
                    sink.send(Frame::new(Kind::Ping, 0, id, p));
                    continue;
                }
                Message::Pong(p) => {
                    sink.send(Frame::new(Kind::Pong, 0, id, p));
                    continue;
                }
                Message::Close(cf) => {
                    let parts = cf.map(|cf| (u16::from(cf.code), cf.reason.to_string()));
                    sink.send(match &parts {
                        Some((code, reason)) => Frame::close(id, *code, reason),
                        None => Frame::close_empty(id),
                    });
                    return Ending::LocalClose(parts);
                }
                Message::Frame(_) => continue,
            };
            if payload.is_empty() {
                sink.send(Frame::data(id, text, true, payload));
                continue;
            }
            let mut offset = 0;
            while offset < payload.len() {
                // A chunk never exceeds the window, or its credit could never be granted.
                let len = MAX_CHUNK.min(window as usize).min(payload.len() - offset);
                match credits.acquire_many(len as u32).await {
                    Ok(permit) => permit.forget(),
                    // Closed by `terminate`: the writer is ending the session.
                    Err(_) => return Ending::RemoteLost("session terminated".into()),
                }
                let fin = offset + len == payload.len();
                sink.send(Frame::data(
                    id,
                    text,
                    fin,
                    payload.slice(offset..offset + len),
                ));
                sent += len as u64;
                offset += len;
            }
        }
    };

    let writer = async {
        let mut partial = BytesMut::new();
        let mut consumed = 0usize;
        let grant_at = (window as usize / 4).max(1);
        loop {
            let Some(frame) = rx.recv().await else {
                return (Ending::RemoteLost("link closed".into()), false);
            };
            let result = match frame.kind {
                Kind::Data => {
                    let len = frame.payload.len();
                    queued.fetch_sub(len, Ordering::AcqRel);
                    received += len as u64;
                    consumed += len;
                    if consumed >= grant_at {
                        sink.send(Frame::window(id, consumed as u32));
                        consumed = 0;
                    }
                    let text = frame.is_text();
                    let whole = if !frame.is_fin() {
                        if partial.len() + len > crate::MAX_MESSAGE_SIZE {
                            sink.send(Frame::abort(id, "message too large"));
                            return (
                                Ending::RemoteLost(format!(
                                    "peer sent a message over {} bytes",
                                    crate::MAX_MESSAGE_SIZE
                                )),
                                false,
                            );
                        }
                        partial.extend_from_slice(&frame.payload);
                        continue;
                    } else if partial.is_empty() {
                        frame.payload
                    } else {
                        partial.extend_from_slice(&frame.payload);
                        partial.split().freeze()
                    };
                    let msg = if text {
                        match Utf8Bytes::try_from(whole) {
                            Ok(t) => Message::Text(t),
                            Err(_) => {
                                let reason = "peer sent a text message that is not UTF-8";
                                sink.send(Frame::close(id, 1007, reason));
                                let _ = ws_tx.send(close_message(1007, reason)).await;
                                return (Ending::RemoteLost(reason.into()), true);
                            }
                        }
                    } else {
                        Message::Binary(whole)
                    };
                    ws_tx.send(msg).await
                }
                Kind::Ping => ws_tx.send(Message::Ping(frame.payload)).await,
                Kind::Pong => ws_tx.send(Message::Pong(frame.payload)).await,
                Kind::Close => {
                    if frame.is_abort() {
                        let reason = frame
                            .close_parts()
                            .ok()
                            .flatten()
                            .map(|(_, r)| r)
                            .unwrap_or_default();
                        return (Ending::RemoteLost(reason), false);
                    }
                    let parts = frame.close_parts().ok().flatten();
                    let msg = match &parts {
                        Some((code, reason)) => close_message(*code, reason),
                        None => Message::Close(None),
                    };
                    let _ = ws_tx.send(msg).await;
                    return (Ending::RemoteClose(parts), true);
                }
                Kind::Open | Kind::Opened | Kind::Window => Ok(()),
            };
            if let Err(e) = result {
                sink.send(Frame::abort(id, "connection lost"));
                return (Ending::LocalLost(e.to_string()), false);
            }
        }
    };

    let (ending, sent_close) = tokio::select! {
        ending = reader => (ending, false),
        done = writer => done,
    };
    if let Ending::LocalClose(_) = ending {
        // tungstenite has queued its answer to the peer's Close; send it before hanging up, so
        // the peer sees a complete close handshake.
        let _ = tokio::time::timeout(CLOSE_LINGER, ws_tx.close()).await;
    }
    if sent_close {
        // Give the WebSocket peer a moment to answer our Close, so it sees a clean end.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(_)) = ws_rx.next().await {}
        })
        .await;
    }
    credits.close();
    Summary {
        id,
        sent,
        received,
        ending,
    }
}

/// A WebSocket Close for a code from the other side. Codes that must never appear on the wire
/// (1005, 1006, 1015, and unassigned ones) become 1011 so the close stays valid.
pub fn close_message(code: u16, reason: &str) -> Message {
    let code = CloseCode::from(code);
    let code = if code.is_allowed() {
        code
    } else {
        CloseCode::Error
    };
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Frame>>);
    impl FrameSink for Collect {
        fn send(&self, frame: Frame) {
            self.0.lock().unwrap().push(frame);
        }
    }

    async fn ws_pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (
            WebSocketStream::from_raw_socket(a, Role::Server, None).await,
            WebSocketStream::from_raw_socket(b, Role::Client, None).await,
        )
    }

    #[tokio::test]
    async fn messages_become_chunks_within_the_window_and_back() {
        let (server, mut client) = ws_pair().await;
        let window = 100_000;
        let (handle, peer) = new_session(5, window);
        let sink = Arc::new(Collect::default());
        let task = tokio::spawn(pump(server, peer, sink.clone()));

        // 150 KB: more than the window, so the pump must stop after 100 KB until credit arrives.
        let big = Bytes::from((0..150_000u32).map(|i| i as u8).collect::<Vec<_>>());
        client.send(Message::Binary(big.clone())).await.unwrap();
        client.send(Message::Text("hi".into())).await.unwrap();
        let total = |sink: &Collect| -> usize {
            sink.0.lock().unwrap().iter().map(|f| f.payload.len()).sum()
        };
        // Chunks are capped at the window: the first fills it, so the pump must stop there.
        let first = MAX_CHUNK.min(window as usize);
        while total(&sink) < first {
            tokio::task::yield_now().await;
        }
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(total(&sink), first, "pump overran its window");
        // Credit for what the far side consumed lets the rest through.
        handle.deliver(Frame::window(5, first as u32)).unwrap();
        while total(&sink) < big.len() + 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            handle.deliver(Frame::window(5, window)),
            Err(SessionViolation::CreditOverflow { credit: window })
        );

        // Frames from the link come out as whole messages, in order.
        handle
            .deliver(Frame::data(5, false, false, Bytes::from_static(b"ab")))
            .unwrap();
        handle
            .deliver(Frame::data(5, false, true, Bytes::from_static(b"cd")))
            .unwrap();
        handle
            .deliver(Frame::data(5, true, true, Bytes::from_static(b"t")))
            .unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"abcd"))
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Text("t".into())
        );
        handle.deliver(Frame::close(5, 4000, "done")).unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(cf)) => {
                assert_eq!(u16::from(cf.code), 4000);
                assert_eq!(cf.reason.as_str(), "done");
            }
            other => panic!("expected close, got {other:?}"),
        }
        drop(client);
        let summary = task.await.unwrap();
        assert_eq!(
            summary.ending,
            Ending::RemoteClose(Some((4000, "done".into())))
        );

        let frames = sink.0.lock().unwrap();
        let mut data = BytesMut::new();
        for f in frames
            .iter()
            .filter(|f| f.kind == Kind::Data && !f.is_text())
        {
            assert!(f.payload.len() <= MAX_CHUNK);
            data.extend_from_slice(&f.payload);
        }
        assert_eq!(&data[..], &big[..]);
        assert!(frames
            .iter()
            .any(|f| f.kind == Kind::Data && f.is_text() && &f.payload[..] == b"hi"));
    }

    #[tokio::test]
    async fn a_peer_overrunning_the_window_is_refused() {
        let (handle, _peer) = new_session(1, 10);
        handle
            .deliver(Frame::data(
                1,
                false,
                true,
                Bytes::from_static(b"0123456789"),
            ))
            .unwrap();
        assert!(matches!(
            handle.deliver(Frame::data(1, false, true, Bytes::from_static(b"x"))),
            Err(SessionViolation::WindowExceeded { .. })
        ));
    }

    #[test]
    fn reserved_close_codes_are_replaced() {
        match close_message(1006, "x") {
            Message::Close(Some(cf)) => assert_eq!(cf.code, CloseCode::Error),
            _ => unreachable!(),
        }
        match close_message(4001, "x") {
            Message::Close(Some(cf)) => assert_eq!(u16::from(cf.code), 4001),
            _ => unreachable!(),
        }
    }
}
