//! One TCP connection carried over one WebSocket: what backhaul-frontend and backhaul-backend
//! both do at their ends of the stack.
//!
//! The convention (also in `docs/protocol.md`): binary messages carry bytes; an empty binary
//! message means "my TCP peer shut down its sending side", which the other end turns into
//! `shutdown(Write)` on its own socket while it keeps reading. That is how half-close crosses the
//! stack. When both directions have ended, Close 1000 ends the WebSocket. A TCP error becomes
//! Close 1011 with a reason; an abnormal Close from the far end aborts the TCP side.
//!
//! [`Wire::GoogleTcpBridge`] speaks the framing of Google's tcp-bridge (inverting-proxy
//! `utils/tcpbridge`) instead, so either half of a Google pair can be replaced by backhaul's:
//! bytes travel as lower-case hex in text messages of at most 32 KiB of data; binary and empty
//! text messages mean nothing. That framing cannot say "end of stream", so a TCP end-of-stream
//! becomes Close 1000 (Google's programs answer it and stop), and the peer ending the WebSocket,
//! with a Close or by dropping the connection as Google's programs do, ends the TCP side.

use crate::lazy_read::LazyRead;
use crate::ws::{Event, Role, WsReader, WsWriter};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

/// How long to wait for the far end's Close after both directions have ended or we sent ours.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How a bridged connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEnd {
    /// Both directions ended cleanly.
    Clean,
    /// The far end closed the WebSocket with this code and reason before both directions ended.
    Closed(u16, String),
    /// Something failed; the text says what.
    Failed(String),
}

impl std::fmt::Display for BridgeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeEnd::Clean => write!(f, "both directions ended"),
            BridgeEnd::Closed(code, r) if r.is_empty() => {
                write!(f, "closed by the far end (code {code})")
            }
            BridgeEnd::Closed(code, r) => write!(f, "closed by the far end (code {code}): {r}"),
            BridgeEnd::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Bytes moved and how the connection ended.
#[derive(Debug, Clone)]
pub struct BridgeSummary {
    /// Bytes read from TCP and sent into the WebSocket.
    pub to_ws: u64,
    /// Bytes received from the WebSocket and written to TCP.
    pub from_ws: u64,
    pub end: BridgeEnd,
}

/// How TCP bytes are framed in WebSocket messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// backhaul's own: binary messages, an empty one for end-of-stream.
    #[default]
    Backhaul,
    /// Google's tcp-bridge: hex in text messages, no end-of-stream marker.
    GoogleTcpBridge,
}

/// The path under which Google's tcp-bridge backend serves, and its frontend asks.
pub const GOOGLE_TCPBRIDGE_PATH: &str =
    "/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96";

/// Most TCP bytes per message in Google's framing (what its programs read at once).
const GOOGLE_CHUNK: usize = 32 * 1024;

/// Carries `tcp_read`/`tcp_write` over the WebSocket on `ws` (handshake done, we are `role`),
/// framed as `wire` says, until both directions end or either side fails.
pub async fn run<R, W, S>(
    mut tcp_read: R,
    mut tcp_write: W,
    ws: S,
    role: Role,
    wire: Wire,
) -> BridgeSummary
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite,
{
    let (ws_read, ws_write) = tokio::io::split(ws);
    // Messages are streamed to TCP piece by piece, so their size costs no memory: no limit.
    let mut stream = WsReader::new(ws_read, role, u64::MAX);
    let sink = Mutex::new(WsWriter::new(ws_write, role));
    // Atomics only so the future is Send; both directions run in this one task.
    let up_done = AtomicBool::new(false);
    let down_done = AtomicBool::new(false);
    let to_ws = AtomicU64::new(0);
    let from_ws = AtomicU64::new(0);

    // TCP -> WebSocket. Returns Err with a reason if TCP or the WebSocket failed.
    let up = async {
        // Reads allocate their buffer only once data is there: idle connections hold none. A
        // message is at most one link frame (MAX_CHUNK), so nothing has to reassemble it.
        let mut tcp_read = LazyRead::new(&mut tcp_read);
        let max = match wire {
            Wire::Backhaul => crate::wire::MAX_CHUNK,
            Wire::GoogleTcpBridge => GOOGLE_CHUNK,
        };
        loop {
            let chunk = match tcp_read.read_chunk(max).await {
                Ok(c) => c,
                Err(e) => {
                    let reason = format!("TCP read failed: {e}");
                    let _ = sink.lock().await.close(Some((1011, &reason))).await;
                    return Err(reason);
                }
            };
            let n = chunk.len();
            let mut sink = sink.lock().await;
            let sent = match wire {
                Wire::Backhaul => sink.data(false, true, &chunk).await,
                Wire::GoogleTcpBridge if n == 0 => {
                    // No end-of-stream in this framing: say we are done.
                    up_done.store(true, Relaxed);
                    let _ = sink.close(Some((1000, ""))).await;
                    return Ok(());
                }
                Wire::GoogleTcpBridge => {
                    let text = Bytes::from(hex::encode(&chunk));
                    sink.data(true, true, &text).await
                }
            };
            if let Err(e) = sent {
                return Err(format!("WebSocket send failed: {e}"));
            }
            if n == 0 {
                up_done.store(true, Relaxed);
                if down_done.load(Relaxed) {
                    let _ = sink.close(Some((1000, ""))).await;
                }
                return Ok(());
            }
            to_ws.fetch_add(n as u64, Relaxed);
        }
    };

    // WebSocket -> TCP. Ends the bridge when it returns.
    let down = async {
        // Bytes of the message being received, to tell the empty end-of-stream marker apart.
        let mut message_len = 0u64;
        let mut hex = HexPieces::default();
        loop {
            let (fin, payload) = match stream.next(crate::wire::MAX_CHUNK).await {
                Ok(Event::Data { text, fin, payload }) if wire == Wire::GoogleTcpBridge => {
                    if !text {
                        continue; // Google's programs ignore binary messages; so do we
                    }
                    match hex.decode(&payload, fin) {
                        Some(bytes) => (false, bytes),
                        None => {
                            let reason = "text message is not hex (Google tcp-bridge framing)";
                            let _ = sink.lock().await.close(Some((1007, reason))).await;
                            return BridgeEnd::Failed(reason.into());
                        }
                    }
                }
                Ok(Event::Data {
                    text: false,
                    fin,
                    payload,
                }) => (fin, payload),
                Ok(Event::Data { text: true, .. }) => {
                    let reason = "text message on a TCP bridge";
                    let _ = sink.lock().await.close(Some((1003, reason))).await;
                    return BridgeEnd::Failed(reason.into());
                }
                Ok(Event::Ping(p)) => {
                    // This end of the session answers pings (see docs/protocol.md).
                    let _ = sink.lock().await.pong(&p).await;
                    continue;
                }
                Ok(Event::Pong(_)) => continue,
                Ok(Event::Close(cf)) => {
                    let mut sink = sink.lock().await;
                    let _ = sink.close(cf.as_ref().map(|(c, r)| (*c, r.as_str()))).await;
                    if wire == Wire::GoogleTcpBridge {
                        let _ = tcp_write.shutdown().await;
                        if matches!(cf, None | Some((1000, _))) {
                            return BridgeEnd::Clean;
                        }
                    }
                    return match cf {
                        _ if up_done.load(Relaxed) && down_done.load(Relaxed) => BridgeEnd::Clean,
                        Some((code, reason)) => BridgeEnd::Closed(code, reason),
                        None => BridgeEnd::Closed(1005, String::new()),
                    };
                }
                // Google's programs end a session by dropping the connection.
                Err(crate::ws::WsError::Eof) if wire == Wire::GoogleTcpBridge => {
                    let _ = tcp_write.shutdown().await;
                    return BridgeEnd::Clean;
                }
                Err(e) => {
                    let reason = format!("WebSocket failed: {e}");
                    if let Some(code) = e.close_code() {
                        let _ = sink.lock().await.close(Some((code, &reason))).await;
                    }
                    return BridgeEnd::Failed(reason);
                }
            };
            if !payload.is_empty() {
                if down_done.load(Relaxed) {
                    return BridgeEnd::Failed("data arrived after the end-of-stream marker".into());
                }
                message_len += payload.len() as u64;
                if let Err(reason) = write_tcp(&mut tcp_write, &payload).await {
                    let _ = sink.lock().await.close(Some((1011, &reason))).await;
                    return BridgeEnd::Failed(reason);
                }
                from_ws.fetch_add(payload.len() as u64, Relaxed);
            }
            if !fin || wire == Wire::GoogleTcpBridge {
                continue;
            }
            let empty = message_len == 0;
            message_len = 0;
            if !empty || down_done.swap(true, Relaxed) {
                continue; // a second EOF marker changes nothing
            }
            let _ = tcp_write.shutdown().await;
            if up_done.load(Relaxed) {
                let _ = sink.lock().await.close(Some((1000, ""))).await;
            }
        }
    };

    let end = {
        tokio::pin!(up);
        tokio::pin!(down);
        let mut up_result: Option<Result<(), String>> = None;
        let end = loop {
            tokio::select! {
                r = &mut up, if up_result.is_none() => {
                    if let Err(reason) = &r {
                        // We told the far end; give it a moment to answer, then give up.
                        let reason = reason.clone();
                        let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
                        break BridgeEnd::Failed(reason);
                    }
                    up_result = Some(r);
                }
                end = &mut down => break end,
            }
        };
        end
    };
    // RFC 6455 7.1.1: the server closes the TCP connection first; a client waits for it.
    let mut sink = sink.into_inner();
    if role == Role::Server {
        let _ = tokio::time::timeout(CLOSE_WAIT, sink.shutdown()).await;
    }
    if sink.is_closed() {
        stream.drain(CLOSE_WAIT).await;
    }
    BridgeSummary {
        to_ws: to_ws.load(Relaxed),
        from_ws: from_ws.load(Relaxed),
        end,
    }
}

/// Decodes hex text that arrives in pieces split anywhere, carrying an odd digit over.
#[derive(Default)]
struct HexPieces {
    carry: Option<u8>,
}

impl HexPieces {
    /// The bytes of `piece`; `None` if it is not hex, or a message ends on an odd digit.
    fn decode(&mut self, piece: &[u8], fin: bool) -> Option<Bytes> {
        let mut digits = Vec::with_capacity(piece.len() + 1);
        digits.extend(self.carry.take());
        digits.extend_from_slice(piece);
        if digits.len() % 2 == 1 {
            self.carry = digits.pop();
        }
        if fin && self.carry.is_some() {
            return None;
        }
        hex::decode(&digits).ok().map(Bytes::from)
    }
}

/// Writes one piece to TCP and flushes it: a socket's flush is free, but stdout (--stdio)
/// buffers by line, and interactive peers (ssh) wait for bytes that never end in a newline.
async fn write_tcp<W: AsyncWrite + Unpin>(w: &mut W, b: &Bytes) -> Result<(), String> {
    w.write_all(b)
        .await
        .map_err(|e| format!("TCP write failed: {e}"))?;
    w.flush()
        .await
        .map_err(|e| format!("TCP write failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{duplex, AsyncReadExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    /// Two bridges back to back (as frontend and backend are), with a "client" and a "service"
    /// on the TCP sides: the client sends, half-closes, and still gets the whole reply.
    #[tokio::test]
    async fn half_close_crosses_two_bridges_and_big_data_is_intact() {
        let (ws_front, ws_back) = duplex(1 << 16);
        let (client, front_tcp) = duplex(1 << 16);
        let (service, back_tcp) = duplex(1 << 16);
        let (fr, fw) = tokio::io::split(front_tcp);
        let (br, bw) = tokio::io::split(back_tcp);
        let front = tokio::spawn(run(fr, fw, ws_front, Role::Client, Wire::Backhaul));
        let back = tokio::spawn(run(br, bw, ws_back, Role::Server, Wire::Backhaul));

        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let reply: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13) as u8).collect();
        let svc = {
            let request = request.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(service);
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap(); // ends only on the client's half-close
                assert!(got == request, "service got different bytes");
                w.write_all(&reply).await.unwrap();
                w.shutdown().await.unwrap();
            })
        };
        let (mut cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            cw.write_all(&request).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        assert!(got == reply, "client got different bytes");
        writer.await.unwrap();
        svc.await.unwrap();
        let f = front.await.unwrap();
        let b = back.await.unwrap();
        assert_eq!(f.end, BridgeEnd::Clean);
        assert_eq!(b.end, BridgeEnd::Clean);
        assert_eq!((f.to_ws, f.from_ws), (3_000_000, 2_000_000));
        assert_eq!((b.to_ws, b.from_ws), (2_000_000, 3_000_000));
    }

    #[tokio::test]
    async fn abnormal_close_from_the_far_end_ends_the_tcp_side() {
        // The far end is tungstenite, an independent implementation, as the server.
        let (ws_local, far) = duplex(1 << 16);
        let mut ws_far = WebSocketStream::from_raw_socket(
            far,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (client, local_tcp) = duplex(1 << 16);
        let (lr, lw) = tokio::io::split(local_tcp);
        let bridge = tokio::spawn(run(lr, lw, ws_local, Role::Client, Wire::Backhaul));
        ws_far
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Error,
                reason: "target refused".into(),
            })))
            .await
            .unwrap();
        let summary = bridge.await.unwrap();
        assert_eq!(
            summary.end,
            BridgeEnd::Closed(1011, "target refused".into())
        );
        // The client's side sees end-of-stream once the bridge dropped its half.
        let (mut cr, _cw) = tokio::io::split(client);
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
