//! One TCP connection carried over one WebSocket: what backhaul-frontend and backhaul-backend
//! both do at their ends of the stack.
//!
//! The convention (also in `docs/protocol.md`): binary messages carry bytes; an empty binary
//! message means "my TCP peer shut down its sending side", which the other end turns into
//! `shutdown(Write)` on its own socket while it keeps reading. That is how half-close crosses the
//! stack. When both directions have ended, Close 1000 ends the WebSocket. A TCP error becomes
//! Close 1011 with a reason; an abnormal Close from the far end aborts the TCP side.

use crate::lazy_read::LazyRead;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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

/// Bytes moved and how the connection ended.
#[derive(Debug, Clone)]
pub struct BridgeSummary {
    /// Bytes read from TCP and sent into the WebSocket.
    pub to_ws: u64,
    /// Bytes received from the WebSocket and written to TCP.
    pub from_ws: u64,
    pub end: BridgeEnd,
}

type Sink<S> = Mutex<SplitSink<WebSocketStream<S>, Message>>;

fn close_frame(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }))
}

/// Carries `tcp_read`/`tcp_write` over `ws` until both directions end or either side fails.
pub async fn run<R, W, S>(
    mut tcp_read: R,
    mut tcp_write: W,
    ws: WebSocketStream<S>,
) -> BridgeSummary
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, mut stream) = ws.split();
    let sink: Sink<S> = Mutex::new(sink);
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
        loop {
            let chunk = match tcp_read.read_chunk(crate::wire::MAX_CHUNK).await {
                Ok(c) => c,
                Err(e) => {
                    let reason = format!("TCP read failed: {e}");
                    let _ = sink
                        .lock()
                        .await
                        .send(close_frame(CloseCode::Error, &reason))
                        .await;
                    return Err(reason);
                }
            };
            let n = chunk.len();
            let msg = Message::Binary(chunk);
            let mut sink = sink.lock().await;
            if let Err(e) = sink.send(msg).await {
                return Err(format!("WebSocket send failed: {e}"));
            }
            if n == 0 {
                up_done.store(true, Relaxed);
                if down_done.load(Relaxed) {
                    let _ = sink.send(close_frame(CloseCode::Normal, "")).await;
                }
                return Ok(());
            }
            to_ws.fetch_add(n as u64, Relaxed);
        }
    };

    // WebSocket -> TCP. Ends the bridge when it returns.
    let down = async {
        loop {
            let msg = match stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return BridgeEnd::Failed(format!("WebSocket failed: {e}")),
                None => {
                    return BridgeEnd::Failed("WebSocket ended without a close handshake".into())
                }
            };
            match msg {
                Message::Binary(b) if b.is_empty() => {
                    if down_done.swap(true, Relaxed) {
                        continue; // a second EOF marker changes nothing
                    }
                    let _ = tcp_write.shutdown().await;
                    if up_done.load(Relaxed) {
                        let _ = sink
                            .lock()
                            .await
                            .send(close_frame(CloseCode::Normal, ""))
                            .await;
                    }
                }
                Message::Binary(b) => {
                    if down_done.load(Relaxed) {
                        return BridgeEnd::Failed(
                            "data arrived after the end-of-stream marker".into(),
                        );
                    }
                    // Flush every chunk: a TCP socket's flush is free, but stdout (--stdio)
                    // buffers by line, and interactive peers (ssh) wait for bytes that never
                    // end in a newline.
                    let written = match tcp_write.write_all(&b).await {
                        Ok(()) => tcp_write.flush().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = written {
                        let reason = format!("TCP write failed: {e}");
                        let _ = sink
                            .lock()
                            .await
                            .send(close_frame(CloseCode::Error, &reason))
                            .await;
                        return BridgeEnd::Failed(reason);
                    }
                    from_ws.fetch_add(b.len() as u64, Relaxed);
                }
                Message::Text(_) => {
                    let reason = "text message on a TCP bridge";
                    let _ = sink
                        .lock()
                        .await
                        .send(close_frame(CloseCode::Unsupported, reason))
                        .await;
                    return BridgeEnd::Failed(reason.into());
                }
                Message::Close(cf) => {
                    return match cf {
                        _ if up_done.load(Relaxed) && down_done.load(Relaxed) => BridgeEnd::Clean,
                        Some(cf) => BridgeEnd::Closed(u16::from(cf.code), cf.reason.to_string()),
                        None => BridgeEnd::Closed(1005, String::new()),
                    };
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    };

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
    // Send whatever tungstenite still holds (its answer to the far end's Close, or ours) and
    // finish the close handshake, so the far end does not see a reset.
    let _ = tokio::time::timeout(CLOSE_WAIT, async { sink.lock().await.close().await }).await;
    BridgeSummary {
        to_ws: to_ws.load(Relaxed),
        from_ws: from_ws.load(Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn ws_pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = duplex(1 << 16);
        (
            WebSocketStream::from_raw_socket(a, Role::Client, None).await,
            WebSocketStream::from_raw_socket(b, Role::Server, None).await,
        )
    }

    /// Two bridges back to back (as frontend and backend are), with a "client" and a "service"
    /// on the TCP sides: the client sends, half-closes, and still gets the whole reply.
    #[tokio::test]
    async fn half_close_crosses_two_bridges_and_big_data_is_intact() {
        let (ws_front, ws_back) = ws_pair().await;
        let (client, front_tcp) = duplex(1 << 16);
        let (service, back_tcp) = duplex(1 << 16);
        let (fr, fw) = tokio::io::split(front_tcp);
        let (br, bw) = tokio::io::split(back_tcp);
        let front = tokio::spawn(run(fr, fw, ws_front));
        let back = tokio::spawn(run(br, bw, ws_back));

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
        let (ws_local, mut ws_far) = ws_pair().await;
        let (client, local_tcp) = duplex(1 << 16);
        let (lr, lw) = tokio::io::split(local_tcp);
        let bridge = tokio::spawn(run(lr, lw, ws_local));
        ws_far
            .send(close_frame(CloseCode::Error, "target refused"))
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
