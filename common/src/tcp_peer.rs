//! A TCP connection seen as the WebSocket peer of a session, following the TCP convention of
//! backhaul-frontend and backhaul-backend (docs/protocol.md): binary messages carry the bytes,
//! an empty message is end-of-stream (half-close), and when both directions have ended the
//! session closes with 1000. It lets the agent carry a session straight to a TCP service
//! (`--backend tcp://HOST:PORT`) through the same pump, flow control and close handshake as a
//! WebSocket backend, without a backhaul-backend in between.
//!
//! What a WebSocket peer would do itself, this does for the TCP peer: it answers pings (the
//! session's far end expects a pong), and it answers a Close from the far end with the same
//! Close, after shutting the connection down. As backhaul-backend does, a failed read or write
//! closes the session with 1011 and the error, and a text message (not part of the convention)
//! with 1003.

use crate::lazy_read::LazyRead;
use crate::session::{PeerRead, PeerWrite};
use crate::ws::{Event, WsError};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Pongs waiting to be answered at most; pings beyond are dropped (a peer flooding pings gets
/// fewer answers, never more memory).
const MAX_PONGS: usize = 16;

/// What the writing half tells the reading half.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Pings from the far end, to answer.
    pongs: VecDeque<Bytes>,
    /// The Close to send: the far end's, answered, or ours after a failure.
    close: Option<Option<(u16, String)>>,
    /// The far end's end-of-stream arrived (our TCP sending side is shut down).
    eof_in: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits `tcp` into the halves a session pump drives.
pub fn tcp_peer<S>(
    tcp: S,
) -> (
    TcpRead<tokio::io::ReadHalf<S>>,
    TcpWrite<tokio::io::WriteHalf<S>>,
)
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (r, w) = tokio::io::split(tcp);
    let shared = Arc::new(Shared::default());
    (
        TcpRead {
            src: LazyRead::new(r),
            shared: shared.clone(),
            eof_out: false,
            closed: false,
        },
        TcpWrite {
            io: w,
            shared,
            in_message: false,
            eof_in: false,
            failed: false,
            closed: false,
        },
    )
}

/// The reading half: the service's bytes as binary messages, its end-of-stream as an empty one.
#[derive(Debug)]
pub struct TcpRead<R> {
    src: LazyRead<R>,
    shared: Arc<Shared>,
    /// The service's end-of-stream went out.
    eof_out: bool,
    /// Our Close went out: nothing more comes from here.
    closed: bool,
}

impl<R: AsyncRead + Unpin + Send> PeerRead for TcpRead<R> {
    async fn next(&mut self, max_piece: usize) -> Result<Event, WsError> {
        loop {
            let woken = self.shared.wake.notified();
            if !self.closed {
                let mut st = self.shared.lock();
                if let Some(p) = st.pongs.pop_front() {
                    return Ok(Event::Pong(p));
                }
                if let Some(close) = st.close.take() {
                    self.closed = true;
                    return Ok(Event::Close(close));
                }
                if self.eof_out && st.eof_in {
                    // Both directions have ended.
                    self.closed = true;
                    return Ok(Event::Close(Some((1000, String::new()))));
                }
            }
            if self.closed || self.eof_out {
                woken.await;
                continue;
            }
            tokio::select! {
                chunk = self.src.read_chunk(max_piece.max(1)) => match chunk {
                    Ok(chunk) => {
                        self.eof_out = chunk.is_empty();
                        return Ok(Event::Data { text: false, fin: true, payload: chunk });
                    }
                    Err(e) => {
                        self.closed = true;
                        return Ok(Event::Close(Some((1011, format!("TCP read failed: {e}")))));
                    }
                },
                _ = woken => {}
            }
        }
    }

    async fn drain(&mut self, _limit: Duration) {
        // A TCP peer has no close handshake to finish.
    }
}

/// The writing half: the far end's messages as bytes, its empty message as end-of-stream.
#[derive(Debug)]
pub struct TcpWrite<W> {
    io: W,
    shared: Arc<Shared>,
    /// Inside a message that has had bytes: an empty final piece ends it, not the stream.
    in_message: bool,
    /// Our sending side is shut down (the far end's end-of-stream came).
    eof_in: bool,
    /// A write failed or the far end broke the convention: what it sends now is dropped while
    /// the session closes with the reason.
    failed: bool,
    closed: bool,
}

impl<W: AsyncWrite + Unpin + Send> TcpWrite<W> {
    fn tell(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.shared.lock());
        self.shared.wake.notify_one();
    }

    /// Closes the session with `code` and `reason`: the reading half sends the Close, and what
    /// the far end still sends is dropped until it answers.
    fn fail(&mut self, code: u16, reason: String) {
        if !self.failed {
            self.failed = true;
            self.tell(|st| st.close = Some(Some((code, reason))));
        }
    }
}

impl<W: AsyncWrite + Unpin + Send> PeerWrite for TcpWrite<W> {
    async fn data(&mut self, text: bool, fin: bool, payload: &Bytes) -> io::Result<()> {
        if self.failed {
            return Ok(());
        }
        if text {
            self.fail(1003, "a TCP service takes binary messages only".into());
            return Ok(());
        }
        let end_of_stream = payload.is_empty() && fin && !self.in_message;
        self.in_message = !fin;
        if end_of_stream {
            if !self.eof_in {
                // Shut down our sending side and keep reading.
                self.eof_in = true;
                let _ = self.io.shutdown().await;
                self.tell(|st| st.eof_in = true);
            }
            return Ok(());
        }
        if let Err(e) = self.io.write_all(payload).await {
            self.fail(1011, format!("TCP write failed: {e}"));
        }
        Ok(())
    }

    async fn ping(&mut self, payload: &Bytes) -> io::Result<()> {
        let payload = payload.clone();
        self.tell(|st| {
            if st.pongs.len() < MAX_PONGS {
                st.pongs.push_back(payload);
            }
        });
        Ok(())
    }

    async fn pong(&mut self, _payload: &Bytes) -> io::Result<()> {
        Ok(())
    }

    async fn close(&mut self, close: Option<(u16, &str)>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let _ = self.io.shutdown().await;
        let close = close.map(|(c, r)| (c, r.to_string()));
        self.tell(|st| st.close = Some(close));
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.closed
    }

    async fn finish(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::testing::Collect;
    use crate::session::{new_session, pump_peer, Ending};
    use crate::window::WindowConfig;
    use crate::wire::{Frame, Kind};
    use tokio::io::AsyncReadExt;

    /// A pump of session 5 whose peer is the TCP connection to `service` (a pipe of
    /// `pipe` bytes): the service's end, the link's handle, what the pump sent, its task.
    #[allow(clippy::type_complexity)]
    fn started(
        pipe: usize,
    ) -> (
        tokio::io::DuplexStream,
        crate::session::SessionHandle,
        Arc<Collect>,
        tokio::task::JoinHandle<crate::session::Summary>,
    ) {
        let (service, agent_side) = tokio::io::duplex(pipe);
        let (handle, peer) = new_session(5, &WindowConfig::fixed(100_000));
        let sink = Arc::new(Collect::default());
        let (r, w) = tcp_peer(agent_side);
        let task = tokio::spawn(pump_peer(r, w, peer, sink.clone()));
        (service, handle, sink, task)
    }

    /// The agent's side of a session to a TCP service: bytes both ways, pings answered, each
    /// end-of-stream carried, and Close 1000 once both directions have ended.
    #[tokio::test]
    async fn a_tcp_service_speaks_the_convention_through_its_peer() {
        let (mut service, handle, sink, task) = started(64 * 1024);
        let mut seen = 0;

        handle
            .deliver(Frame::data(5, false, true, Bytes::from_static(b"hello")))
            .unwrap();
        let mut buf = [0u8; 5];
        service.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        service.write_all(b"world").await.unwrap();
        let f = sink.next_of(Kind::Data, &mut seen).await;
        assert_eq!((&f.payload[..], f.is_fin()), (&b"world"[..], true));

        handle
            .deliver(Frame::new(Kind::Ping, 0, 5, Bytes::from_static(b"p")))
            .unwrap();
        let f = sink.next_of(Kind::Pong, &mut seen).await;
        assert_eq!(
            &f.payload[..],
            b"p",
            "the TCP side's stand-in answers pings"
        );

        // The far end's end-of-stream shuts down the service's input; the service still talks.
        handle
            .deliver(Frame::data(5, false, true, Bytes::new()))
            .unwrap();
        assert_eq!(service.read(&mut buf).await.unwrap(), 0);
        service.write_all(b"late").await.unwrap();
        let f = sink.next_of(Kind::Data, &mut seen).await;
        assert_eq!(&f.payload[..], b"late");
        // The service's end-of-stream goes out as an empty message, then both have ended.
        service.shutdown().await.unwrap();
        let f = sink.next_of(Kind::Data, &mut seen).await;
        assert!(f.payload.is_empty() && f.is_fin());
        let f = sink.next_of(Kind::Close, &mut seen).await;
        assert_eq!(f.close_parts().unwrap(), Some((1000, String::new())));
        handle.deliver(Frame::close(5, 1000, "")).unwrap();
        let summary = task.await.unwrap();
        assert_eq!(
            summary.ending,
            Ending::LocalClose(Some((1000, String::new())))
        );
        assert_eq!((summary.sent, summary.received), (9, 5));
    }

    /// A Close from the far end is answered with the same Close, and the service's connection
    /// ends.
    #[tokio::test]
    async fn the_far_ends_close_ends_the_connection_and_is_answered() {
        let (mut service, handle, sink, task) = started(64 * 1024);
        handle.deliver(Frame::close(5, 4001, "gone")).unwrap();
        let mut seen = 0;
        let f = sink.next_of(Kind::Close, &mut seen).await;
        assert_eq!(f.close_parts().unwrap(), Some((4001, "gone".to_string())));
        let summary = task.await.unwrap();
        assert_eq!(
            summary.ending,
            Ending::RemoteClose(Some((4001, "gone".to_string())))
        );
        let mut rest = Vec::new();
        service.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// A service that went away, or a text message, closes the session with a code and the
    /// reason, as backhaul-backend does (1011, 1003).
    #[tokio::test]
    async fn failures_close_with_a_code_and_the_reason() {
        let (service, handle, sink, task) = started(1024);
        drop(service);
        handle
            .deliver(Frame::data(5, false, true, Bytes::from_static(b"anyone?")))
            .unwrap();
        let mut seen = 0;
        let (code, reason) = sink
            .next_of(Kind::Close, &mut seen)
            .await
            .close_parts()
            .unwrap()
            .unwrap();
        assert_eq!(code, 1011);
        assert!(reason.starts_with("TCP write failed"), "{reason}");
        handle.deliver(Frame::close(5, 1011, "")).unwrap();
        task.await.unwrap();

        let (_service, handle, sink, _task) = started(1024);
        handle
            .deliver(Frame::data(5, true, true, Bytes::from_static(b"text")))
            .unwrap();
        let mut seen = 0;
        let f = sink.next_of(Kind::Close, &mut seen).await;
        assert_eq!(f.close_parts().unwrap().unwrap().0, 1003);
    }
}
