//! One session between a WebSocket and the agent link, with per-session flow control. The relay
//! runs it between a frontend's WebSocket and its link to an agent; the agent runs it between
//! its link and the backend's WebSocket. The same code on both sides keeps the two ends honest.
//!
//! Flow control works like HTTP/2's: each direction of a session has a window of `window` bytes.
//! A sender spends window on every DATA, PING and PONG frame (its payload plus [`FRAME_COST`])
//! and waits when none is left; the receiver gives it back with WINDOW frames once its writer
//! has written the frame to its WebSocket. So a slow reader stops its writer at the other end of
//! the stack, a flood of pings or empty messages is bounded like data, and no buffer anywhere
//! grows past the window. Messages are carried in pieces as they arrive and written out as
//! WebSocket fragments, so no message is ever held whole, whatever its size. Windows start
//! small and grow to fit the path while a session needs it ([`crate::window`]).

pub use crate::window::SessionViolation;
use crate::window::{SessionFlow, Spend, WindowConfig, IDLE_RETURN};
use crate::wire::{Frame, Kind, FLAG_BLOCKED, MAX_CHUNK};
use crate::ws::{Event, Role, WsError, WsReader, WsWriter};
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Notify};

/// How long to wait for the WebSocket peer's answer after we send a Close.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Where a session's outgoing frames go: the link's send queue.
pub trait FrameSink: Send + Sync + 'static {
    /// Queues a frame for the peer. Never blocks: flow control bounds what a session queues.
    fn send(&self, frame: Frame);
}

/// A session's flow control, shared by the link's side and the pump. Lock order: a caller may
/// take this lock while holding the link's, never the other way round, so nothing is sent to
/// the link while it is held.
#[derive(Debug)]
struct Flow {
    state: Mutex<SessionFlow>,
    /// Wakes the pump's reader when credit arrives or the session ends.
    credit: Notify,
}

impl Flow {
    fn lock(&self) -> MutexGuard<'_, SessionFlow> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The link's side of a session: where the link hands the frames it receives for it.
#[derive(Debug)]
pub struct SessionHandle {
    tx: mpsc::UnboundedSender<Frame>,
    flow: Arc<Flow>,
    /// Told about the session's first OPENED or CLOSE, for a side that waits for the far end
    /// to accept before it answers its own client (the relay, when subprotocols are offered).
    accepted: std::sync::Mutex<Option<oneshot::Sender<Frame>>>,
}

/// The pump's side of a session, consumed by [`pump`].
#[derive(Debug)]
pub struct SessionPeer {
    id: u32,
    rx: mpsc::UnboundedReceiver<Frame>,
    flow: Arc<Flow>,
    /// Largest piece of a message the pump sends in one frame.
    max_piece: usize,
}

/// Creates the two sides of session `id`, with windows each way sized by `windows` (both ends
/// of a link use the same configuration: the relay's, announced in its link info).
pub fn new_session(id: u32, windows: &WindowConfig) -> (SessionHandle, SessionPeer) {
    // Unbounded in type only: DATA is bounded by the window (checked in `deliver`), and the
    // control frames a well-behaved peer sends are bounded by the DATA they answer.
    let (tx, rx) = mpsc::unbounded_channel();
    // A piece and its frame cost never exceed the window, or its credit could never be granted.
    let max_piece = MAX_CHUNK.min(windows.initial as usize - FRAME_COST);
    let flow = Arc::new(Flow {
        state: Mutex::new(SessionFlow::new(windows, max_piece + FRAME_COST)),
        credit: Notify::new(),
    });
    (
        SessionHandle {
            tx,
            flow: flow.clone(),
            accepted: std::sync::Mutex::new(None),
        },
        SessionPeer {
            id,
            rx,
            flow,
            max_piece,
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
            Kind::Window | Kind::Return => {
                let credit = frame
                    .window_credit()
                    .map_err(|_| SessionViolation::Malformed(frame.kind))?;
                if frame.kind == Kind::Return {
                    self.flow.lock().give_back(credit);
                } else {
                    self.flow.lock().credit(credit)?;
                    self.flow.credit.notify_one();
                }
                Ok(())
            }
            Kind::Data | Kind::Ping | Kind::Pong => {
                self.flow.lock().arrive(window_cost(&frame))?;
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
        self.flow.lock().close();
        self.flow.credit.notify_one();
    }

    /// Whether the pump has finished.
    pub fn is_finished(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Flow-control cost of one frame beyond its payload: what the link spends on it. Charging it
/// for every DATA, PING and PONG frame bounds what a flood of empty messages or pings can queue,
/// like any other data.
pub const FRAME_COST: usize = 16;

/// What `frame` spends of its session's window.
pub fn window_cost(frame: &Frame) -> usize {
    match frame.kind {
        Kind::Data | Kind::Ping | Kind::Pong => frame.payload.len() + FRAME_COST,
        _ => 0,
    }
}

/// How a session ended, for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Our WebSocket peer closed (code, reason) and the far end answered.
    LocalClose(Option<(u16, String)>),
    /// The far end closed (code, reason), and our WebSocket peer answered.
    RemoteClose(Option<(u16, String)>),
    /// We closed our WebSocket peer with this code for breaking the rules (a message over the
    /// limit, a protocol violation).
    Refused(u16, String),
    /// Our WebSocket broke without a close handshake.
    LocalLost(String),
    /// The link's peer reported its side lost, or the link itself went away.
    RemoteLost(String),
}

fn describe_close(parts: &Option<(u16, String)>) -> String {
    match parts {
        None => "no status code".into(),
        Some((code, r)) if r.is_empty() => format!("code {code}"),
        Some((code, r)) => format!("code {code}, {r:?}"),
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::LocalClose(c) => {
                write!(f, "closed by this side's peer ({})", describe_close(c))
            }
            Ending::RemoteClose(c) => write!(f, "closed by the far end ({})", describe_close(c)),
            Ending::Refused(code, r) => write!(f, "refused this side's peer with code {code}: {r}"),
            Ending::LocalLost(r) => write!(f, "this side's connection was lost: {r}"),
            Ending::RemoteLost(r) => write!(f, "the far end was lost: {r}"),
        }
    }
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

/// How the WebSocket side of a session is set up.
#[derive(Debug, Clone, Copy)]
pub struct WsSide {
    /// Our role on the WebSocket: the relay is the server to its client, the agent the client of
    /// its backend.
    pub role: Role,
    /// Largest data message our WebSocket peer may send; a larger one is refused with 1009.
    pub max_message: u64,
}

/// How the reader (our WebSocket peer -> link) stopped.
enum ReadEnd {
    /// The peer sent its Close, now passed on.
    Closed(Option<(u16, String)>),
    /// The peer broke the rules: close it with this code.
    Refused(u16, String),
    Lost(String),
    /// `terminate` closed the session's credit.
    Terminated,
}

/// How the writer (link -> our WebSocket peer) stopped.
enum WriteEnd {
    /// The far end's Close, now sent to our peer.
    Closed(Option<(u16, String)>),
    Aborted(String),
    Lost(String),
    LinkGone,
}

/// Whether the session is over, from how each side has ended so far.
fn decide(
    read: &Option<ReadEnd>,
    write: &Option<WriteEnd>,
    local_first: bool,
    timed_out: bool,
) -> Option<Ending> {
    Some(match (read, write) {
        (Some(ReadEnd::Refused(code, r)), _) => Ending::Refused(*code, r.clone()),
        (Some(ReadEnd::Lost(r)), _) | (_, Some(WriteEnd::Lost(r))) => Ending::LocalLost(r.clone()),
        (Some(ReadEnd::Terminated), _) => Ending::RemoteLost("session terminated".into()),
        (_, Some(WriteEnd::Aborted(r))) => Ending::RemoteLost(r.clone()),
        (_, Some(WriteEnd::LinkGone)) => Ending::RemoteLost("link closed".into()),
        (Some(ReadEnd::Closed(local)), Some(WriteEnd::Closed(remote))) => {
            if local_first {
                Ending::LocalClose(local.clone())
            } else {
                Ending::RemoteClose(remote.clone())
            }
        }
        (Some(ReadEnd::Closed(local)), None) if timed_out => Ending::LocalClose(local.clone()),
        (None, Some(WriteEnd::Closed(remote))) if timed_out => Ending::RemoteClose(remote.clone()),
        _ => return None,
    })
}

/// The local end of a session as its pump reads it: the events of a WebSocket peer.
pub trait PeerRead: Send {
    /// The next event, data in pieces of at most `max_piece` bytes. Cancel-safe.
    fn next(&mut self, max_piece: usize) -> impl Future<Output = Result<Event, WsError>> + Send;
    /// After a clean ending: reads and drops what the peer still sends, for up to `limit`.
    fn drain(&mut self, limit: Duration) -> impl Future<Output = ()> + Send;
}

/// The local end of a session as its pump writes to it.
pub trait PeerWrite: Send {
    /// A piece of a data message; `fin` ends the message.
    fn data(
        &mut self,
        text: bool,
        fin: bool,
        payload: &Bytes,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn ping(&mut self, payload: &Bytes) -> impl Future<Output = io::Result<()>> + Send;
    fn pong(&mut self, payload: &Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a Close (once).
    fn close(&mut self, close: Option<(u16, &str)>) -> impl Future<Output = io::Result<()>> + Send;
    fn is_closed(&self) -> bool;
    /// After a clean ending, before the reader drains.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

impl<R: AsyncRead + Unpin + Send> PeerRead for WsReader<R> {
    async fn next(&mut self, max_piece: usize) -> Result<Event, WsError> {
        WsReader::next(self, max_piece).await
    }

    async fn drain(&mut self, limit: Duration) {
        WsReader::drain(self, limit).await
    }
}

impl<W: AsyncWrite + Unpin + Send> PeerWrite for WsWriter<W> {
    async fn data(&mut self, text: bool, fin: bool, payload: &Bytes) -> io::Result<()> {
        WsWriter::data(self, text, fin, payload).await
    }

    async fn ping(&mut self, payload: &Bytes) -> io::Result<()> {
        WsWriter::ping(self, payload).await
    }

    async fn pong(&mut self, payload: &Bytes) -> io::Result<()> {
        WsWriter::pong(self, payload).await
    }

    async fn close(&mut self, close: Option<(u16, &str)>) -> io::Result<()> {
        WsWriter::close(self, close).await
    }

    fn is_closed(&self) -> bool {
        WsWriter::is_closed(self)
    }

    async fn finish(&mut self) {
        // RFC 6455 7.1.1: the server closes the TCP connection first; a client waits for it.
        if self.role() == Role::Server {
            let _ = tokio::time::timeout(CLOSE_LINGER, self.shutdown()).await;
        }
    }
}

/// Runs one session between a WebSocket and the link until both sides have closed or either is
/// lost. Frames for the far end go to `sink`. The close handshake is carried end to end: after
/// one side's Close, messages from the other still flow until its own Close comes back
/// (bounded by [`CLOSE_LINGER`]).
pub async fn pump<S>(io: S, side: WsSide, peer: SessionPeer, sink: Arc<dyn FrameSink>) -> Summary
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (r, w) = tokio::io::split(io);
    let reader = WsReader::new(r, side.role, side.max_message);
    let writer = WsWriter::new(w, side.role);
    pump_peer(reader, writer, peer, sink).await
}

/// Runs one session between a local peer (a WebSocket, or a TCP connection seen as one: see
/// [`crate::tcp_peer`]) and the link; see [`pump`].
pub async fn pump_peer<R: PeerRead, W: PeerWrite>(
    mut ws_rx: R,
    writer: W,
    peer: SessionPeer,
    sink: Arc<dyn FrameSink>,
) -> Summary {
    let SessionPeer {
        id,
        mut rx,
        flow,
        max_piece,
    } = peer;
    let ws_tx = tokio::sync::Mutex::new(writer);
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);

    // Waits until the credit covers `cost` and spends it; `None` once the session is over, else
    // whether the frame leaves the sender window-limited.
    let spend = |cost: usize| {
        let flow = &flow;
        async move {
            loop {
                let credit = flow.credit.notified();
                match flow.lock().spend(cost) {
                    Spend::Go { blocked } => return Some(blocked),
                    Spend::Closed => return None,
                    Spend::Wait => {}
                }
                credit.await;
            }
        }
    };

    let reader = async {
        loop {
            // Once the window may have grown, credit beyond the initial window goes back after
            // IDLE_RETURN without sending (see crate::window).
            let next = if flow.lock().may_hold_growth() {
                match tokio::time::timeout(IDLE_RETURN, ws_rx.next(max_piece)).await {
                    Ok(next) => next,
                    Err(_) => {
                        let returned = flow.lock().idle();
                        if let Some(credit) = returned {
                            sink.send(Frame::window_return(id, credit));
                        }
                        continue;
                    }
                }
            } else {
                ws_rx.next(max_piece).await
            };
            let frame = match next {
                Ok(Event::Data { text, fin, payload }) => {
                    sent.fetch_add(payload.len() as u64, Relaxed);
                    Frame::data(id, text, fin, payload)
                }
                Ok(Event::Ping(p)) => Frame::new(Kind::Ping, 0, id, p),
                Ok(Event::Pong(p)) => Frame::new(Kind::Pong, 0, id, p),
                Ok(Event::Close(parts)) => {
                    sink.send(match &parts {
                        Some((code, reason)) => Frame::close(id, *code, reason),
                        None => Frame::close_empty(id),
                    });
                    return ReadEnd::Closed(parts);
                }
                Err(e) => {
                    let reason = e.to_string();
                    return match e.close_code() {
                        Some(code) => {
                            let why =
                                format!("the other end of the tunnel closed its peer: {reason}");
                            sink.send(Frame::close(id, code, &why));
                            ReadEnd::Refused(code, reason)
                        }
                        // A peer that hangs up after our Close has ended the handshake.
                        None if ws_tx.lock().await.is_closed() => {
                            sink.send(Frame::close_empty(id));
                            ReadEnd::Closed(None)
                        }
                        None => {
                            sink.send(Frame::abort(id, "connection lost"));
                            ReadEnd::Lost(reason)
                        }
                    };
                }
            };
            let Some(blocked) = spend(window_cost(&frame)).await else {
                return ReadEnd::Terminated;
            };
            // Too little credit left for another full piece: say so, so that a receiver that
            // keeps up can grow the window (see crate::window).
            let mut frame = frame;
            if blocked {
                frame.flags |= FLAG_BLOCKED;
            }
            sink.send(frame);
        }
    };

    let writer = async {
        loop {
            let Some(frame) = rx.recv().await else {
                return WriteEnd::LinkGone;
            };
            let mut ws = ws_tx.lock().await;
            let result = match frame.kind {
                Kind::Data => {
                    received.fetch_add(frame.payload.len() as u64, Relaxed);
                    ws.data(frame.is_text(), frame.is_fin(), &frame.payload)
                        .await
                }
                Kind::Ping => ws.ping(&frame.payload).await,
                Kind::Pong => ws.pong(&frame.payload).await,
                Kind::Close if frame.is_abort() => {
                    let reason = frame.close_parts().ok().flatten().map(|(_, r)| r);
                    return WriteEnd::Aborted(reason.unwrap_or_default());
                }
                Kind::Close => {
                    let parts = frame.close_parts().ok().flatten();
                    let close = parts.as_ref().map(|(c, r)| (*c, r.as_str()));
                    return match ws.close(close).await {
                        Ok(()) => WriteEnd::Closed(parts),
                        Err(e) => WriteEnd::Lost(e.to_string()),
                    };
                }
                Kind::Open | Kind::Opened | Kind::Window | Kind::Return => Ok(()),
            };
            drop(ws);
            if let Err(e) = result {
                sink.send(Frame::abort(id, "connection lost"));
                return WriteEnd::Lost(e.to_string());
            }
            // Credit goes back once the bytes are written (see SessionFlow::written).
            let cost = window_cost(&frame);
            let grant = (cost > 0)
                .then(|| flow.lock().written(cost, frame.is_blocked()))
                .flatten();
            if let Some(grant) = grant {
                sink.send(Frame::window(id, grant));
            }
        }
    };

    let (ending, read_end) = {
        tokio::pin!(reader);
        tokio::pin!(writer);
        let mut read_end: Option<ReadEnd> = None;
        let mut write_end: Option<WriteEnd> = None;
        // Set when the first side ends: how long the other may take to follow.
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut timed_out = false;
        let mut local_first = false;
        let ending = loop {
            if let Some(ending) = decide(&read_end, &write_end, local_first, timed_out) {
                break ending;
            }
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut reader, if read_end.is_none() => {
                    local_first = write_end.is_none();
                    read_end = Some(r);
                }
                w = &mut writer, if write_end.is_none() => write_end = Some(w),
                _ = timer => timed_out = true,
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + CLOSE_LINGER);
        };
        (ending, read_end)
    };
    flow.lock().close();
    let mut ws = ws_tx.into_inner();
    match &ending {
        Ending::LocalClose(c) if !ws.is_closed() => {
            // The far end never answered: answer our peer's Close ourselves.
            let _ = ws
                .close(c.as_ref().map(|(code, r)| (*code, r.as_str())))
                .await;
            sink.send(Frame::abort(id, "no answer to the close"));
        }
        Ending::Refused(code, reason) => {
            let _ = ws.close(Some((*code, reason))).await;
        }
        Ending::RemoteClose(_) if !matches!(read_end, Some(ReadEnd::Closed(_))) => {
            // Our peer never answered the far end's Close.
            sink.send(Frame::abort(id, "no answer to the close"));
        }
        _ => {}
    }
    let clean = matches!(
        ending,
        Ending::LocalClose(_) | Ending::RemoteClose(_) | Ending::Refused(..)
    );
    if clean {
        ws.finish().await;
        ws_rx.drain(CLOSE_LINGER).await;
    }
    Summary {
        id,
        sent: sent.load(Relaxed),
        received: received.load(Relaxed),
        ending,
    }
}

/// A sink that keeps what a pump sends, for tests of pumps and their peers.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    #[derive(Default)]
    pub(crate) struct Collect(Mutex<Vec<Frame>>);

    impl FrameSink for Collect {
        fn send(&self, frame: Frame) {
            self.0.lock().unwrap().push(frame);
        }
    }

    impl Collect {
        pub(crate) fn kinds(&self, kind: Kind) -> Vec<Frame> {
            let frames = self.0.lock().unwrap();
            frames.iter().filter(|f| f.kind == kind).cloned().collect()
        }

        /// The first frame of `kind` after the `seen` first frames; waits for it.
        pub(crate) async fn next_of(&self, kind: Kind, seen: &mut usize) -> Frame {
            loop {
                {
                    let frames = self.0.lock().unwrap();
                    if let Some(i) = (*seen..frames.len()).find(|&i| frames[i].kind == kind) {
                        *seen = i + 1;
                        return frames[i].clone();
                    }
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Collect;
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    /// A running pump: the link's handle, what it sent, its task, and its WebSocket client.
    type Started = (
        SessionHandle,
        Arc<Collect>,
        tokio::task::JoinHandle<Summary>,
        WebSocketStream<tokio::io::DuplexStream>,
    );

    /// A pump on the server side of a WebSocket, with tungstenite (an independent
    /// implementation) as its client.
    async fn started(window: u32, max_message: u64) -> Started {
        started_with(&WindowConfig::fixed(window), max_message).await
    }

    async fn started_with(windows: &WindowConfig, max_message: u64) -> Started {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client = WebSocketStream::from_raw_socket(
            b,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let (handle, peer) = new_session(5, windows);
        let sink = Arc::new(Collect::default());
        let side = WsSide {
            role: Role::Server,
            max_message,
        };
        let task = tokio::spawn(pump(a, side, peer, sink.clone()));
        (handle, sink, task, client)
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        while !cond() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn messages_become_pieces_within_the_window_and_back() {
        let window = 100_000;
        let (handle, sink, task, mut client) = started(window, 1 << 20).await;
        // 150 KB: more than the window, so the pump must stop until credit arrives.
        let big = Bytes::from((0..150_000u32).map(|i| i as u8).collect::<Vec<_>>());
        client.send(Message::Binary(big.clone())).await.unwrap();
        client.send(Message::Text("hi".into())).await.unwrap();
        let total = || -> usize { sink.kinds(Kind::Data).iter().map(|f| f.payload.len()).sum() };
        // A piece and its cost never exceed the window: the first fills most of it, and the
        // second does not fit in what is left.
        let first = MAX_CHUNK.min(window as usize - FRAME_COST);
        until(|| total() >= first).await;
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(total(), first, "pump overran its window");
        // Credit for what the far side consumed lets the rest through.
        handle
            .deliver(Frame::window(5, (first + FRAME_COST) as u32))
            .unwrap();
        until(|| total() >= big.len() + 2).await;
        assert_eq!(
            handle.deliver(Frame::window(5, window)),
            Err(SessionViolation::CreditOverflow { credit: window })
        );
        let data = sink.kinds(Kind::Data);
        let mut bytes = Vec::new();
        for f in data.iter().filter(|f| !f.is_text()) {
            assert!(f.payload.len() <= MAX_CHUNK);
            bytes.extend_from_slice(&f.payload);
        }
        assert_eq!(bytes, big);
        assert!(data.last().unwrap().is_fin() && &data.last().unwrap().payload[..] == b"hi");

        // Pieces from the link leave as fragments of one message, which the client reassembles.
        for (text, fin, p) in [(false, false, "ab"), (false, true, "cd"), (true, true, "t")] {
            handle
                .deliver(Frame::data(5, text, fin, Bytes::from_static(p.as_bytes())))
                .unwrap();
        }
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
    }

    #[tokio::test]
    async fn after_the_clients_close_the_far_ends_messages_still_arrive() {
        let (handle, sink, task, mut client) = started(100_000, 1 << 20).await;
        client.send(Message::Text("last".into())).await.unwrap();
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await
            .unwrap();
        until(|| !sink.kinds(Kind::Close).is_empty()).await;
        assert_eq!(
            sink.kinds(Kind::Close)[0].close_parts().unwrap(),
            Some((1000, "bye".into()))
        );
        // The far end answers with two messages and then its Close: all reach the client.
        for reply in ["one", "two"] {
            handle
                .deliver(Frame::data(
                    5,
                    true,
                    true,
                    Bytes::from_static(reply.as_bytes()),
                ))
                .unwrap();
        }
        handle.deliver(Frame::close(5, 1000, "bye")).unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Text("one".into())
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Text("two".into())
        );
        assert!(matches!(
            client.next().await.unwrap().unwrap(),
            Message::Close(Some(cf)) if u16::from(cf.code) == 1000
        ));
        let summary = task.await.unwrap();
        assert_eq!(
            summary.ending,
            Ending::LocalClose(Some((1000, "bye".into())))
        );
    }

    #[tokio::test]
    async fn pings_go_to_the_far_end_and_oversized_messages_get_1009() {
        let (handle, sink, task, mut client) = started(100_000, 1000).await;
        client
            .send(Message::Ping(Bytes::from_static(b"are you there")))
            .await
            .unwrap();
        until(|| !sink.kinds(Kind::Ping).is_empty()).await;
        assert_eq!(&sink.kinds(Kind::Ping)[0].payload[..], b"are you there");
        // Only the far end's answer comes back.
        handle
            .deliver(Frame::new(
                Kind::Pong,
                0,
                5,
                Bytes::from_static(b"are you there"),
            ))
            .unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"are you there"))
        );
        client
            .send(Message::Binary(vec![7u8; 1001].into()))
            .await
            .unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(cf)) => {
                assert_eq!(u16::from(cf.code), 1009);
                assert!(cf.reason.contains("1000 bytes"), "{}", cf.reason);
            }
            other => panic!("expected close 1009, got {other:?}"),
        }
        let summary = task.await.unwrap();
        assert!(matches!(summary.ending, Ending::Refused(1009, _)));
        assert_eq!(
            sink.kinds(Kind::Close)
                .last()
                .unwrap()
                .close_parts()
                .unwrap()
                .unwrap()
                .0,
            1009
        );
    }

    #[tokio::test]
    async fn a_window_limited_sender_gets_its_window_grown_when_the_receiver_keeps_up() {
        let budget = crate::window::Budget::new(1 << 20);
        let windows = WindowConfig {
            initial: 1000,
            max: 4000,
            budget: budget.clone(),
        };
        let (handle, sink, _task, mut client) = started_with(&windows, 1 << 20).await;
        let piece = || Bytes::from(vec![7u8; 1000 - FRAME_COST]);
        let credit = |sink: &Collect| -> Vec<u32> {
            sink.kinds(Kind::Window)
                .iter()
                .map(|f| f.window_credit().unwrap())
                .collect()
        };
        // Not window-limited: credit comes back as usual, the window stays.
        handle
            .deliver(Frame::data(5, false, true, piece()))
            .unwrap();
        client.next().await.unwrap().unwrap();
        until(|| !credit(&sink).is_empty()).await;
        assert_eq!(credit(&sink), vec![1000]);
        // Window-limited, and everything written: the credit comes with as much again.
        let mut blocked = Frame::data(5, false, true, piece());
        blocked.flags |= FLAG_BLOCKED;
        handle.deliver(blocked.clone()).unwrap();
        client.next().await.unwrap().unwrap();
        until(|| credit(&sink).len() == 2).await;
        assert_eq!(credit(&sink), vec![1000, 2000]);
        assert_eq!(budget.used(), 1000);
        // The grown window lets twice as much in, and not more.
        handle
            .deliver(Frame::data(5, false, false, piece()))
            .unwrap();
        handle
            .deliver(Frame::data(5, false, false, piece()))
            .unwrap();
        assert!(matches!(
            handle.deliver(Frame::data(5, false, true, Bytes::from_static(b"x"))),
            Err(SessionViolation::WindowExceeded { window: 2000, .. })
        ));
    }

    /// A sender that was window-limited and then sends nothing for IDLE_RETURN gives back what
    /// its window grew by; the receiver shrinks the window and the budget is free again.
    #[tokio::test(start_paused = true)]
    async fn an_idle_sender_gives_back_its_grown_window_and_the_receiver_shrinks() {
        // The sending side: window-limited, granted growth, then idle.
        let windows = WindowConfig {
            initial: 1000,
            max: 4000,
            budget: crate::window::Budget::new(1 << 20),
        };
        let (handle, sink, _task, mut client) = started_with(&windows, 1 << 20).await;
        let sent = |sink: &Collect| -> usize {
            sink.kinds(Kind::Data).iter().map(|f| f.payload.len()).sum()
        };
        client
            .send(Message::Binary(Bytes::from(vec![1u8; 3000])))
            .await
            .unwrap();
        until(|| sent(&sink) == 1000 - FRAME_COST).await;
        assert!(sink.kinds(Kind::Data)[0].is_blocked());
        // The receiver grants back the piece and grows the window by as much again: two more
        // pieces go, and the sender waits for 48 + 16 bytes of credit.
        handle.deliver(Frame::window(5, 2000)).unwrap();
        until(|| sent(&sink) == 3 * (1000 - FRAME_COST)).await;
        handle.deliver(Frame::window(5, 2000)).unwrap();
        until(|| sent(&sink) == 3000).await;
        // 2000 - 64 left, of a window of 2000: 936 more than the initial window.
        assert!(sink.kinds(Kind::Return).is_empty());
        tokio::time::sleep(crate::window::IDLE_RETURN + Duration::from_millis(1)).await;
        let returned: Vec<u32> = sink
            .kinds(Kind::Return)
            .iter()
            .map(|f| f.window_credit().unwrap())
            .collect();
        assert_eq!(
            returned,
            vec![936],
            "the credit above the initial window goes back"
        );

        // The receiving side: a grown window shrinks by what comes back.
        let budget = crate::window::Budget::new(1 << 20);
        let windows = WindowConfig {
            initial: 1000,
            max: 4000,
            budget: budget.clone(),
        };
        let (handle, _sink, _task, mut client) = started_with(&windows, 1 << 20).await;
        let mut blocked = Frame::data(5, false, true, Bytes::from(vec![7u8; 1000 - FRAME_COST]));
        blocked.flags |= FLAG_BLOCKED;
        handle.deliver(blocked).unwrap();
        client.next().await.unwrap().unwrap();
        until(|| budget.used() == 1000).await;
        handle.deliver(Frame::window_return(5, 1000)).unwrap();
        until(|| budget.used() == 0).await;
        handle
            .deliver(Frame::data(
                5,
                false,
                true,
                Bytes::from(vec![7u8; 1000 - FRAME_COST]),
            ))
            .unwrap();
        assert!(matches!(
            handle.deliver(Frame::data(5, false, true, Bytes::new())),
            Err(SessionViolation::WindowExceeded { window: 1000, .. })
        ));
        assert_eq!(
            handle.deliver(Frame::new(Kind::Return, 0, 5, Bytes::from_static(b"x"))),
            Err(SessionViolation::Malformed(Kind::Return))
        );
    }

    #[tokio::test]
    async fn a_sender_marks_the_frame_that_leaves_it_without_credit() {
        let (_handle, sink, _task, mut client) = started(1000, 1 << 20).await;
        client
            .send(Message::Binary(Bytes::from(vec![1u8; 3000])))
            .await
            .unwrap();
        until(|| !sink.kinds(Kind::Data).is_empty()).await;
        let first = &sink.kinds(Kind::Data)[0];
        assert_eq!(first.payload.len(), 1000 - FRAME_COST);
        assert!(
            first.is_blocked(),
            "the piece that used up the window says so"
        );
    }

    #[tokio::test]
    async fn a_peer_overrunning_the_window_with_data_or_pings_is_refused() {
        let (handle, _peer) = new_session(1, &WindowConfig::fixed(100));
        let fill = Bytes::from(vec![0u8; 100 - FRAME_COST]);
        handle.deliver(Frame::data(1, false, true, fill)).unwrap();
        assert!(matches!(
            handle.deliver(Frame::data(1, false, true, Bytes::new())),
            Err(SessionViolation::WindowExceeded { .. })
        ));
        // Empty pings cost window too: a flood of them is refused like data.
        let (handle, _peer) = new_session(1, &WindowConfig::fixed(1000));
        let ping = || Frame::new(Kind::Ping, 0, 1, Bytes::new());
        for _ in 0..1000 / FRAME_COST {
            handle.deliver(ping()).unwrap();
        }
        assert!(matches!(
            handle.deliver(ping()),
            Err(SessionViolation::WindowExceeded { .. })
        ));
    }
}
