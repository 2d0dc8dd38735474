//! TCP services the tests put behind the stack, run in-process on 127.0.0.1:0.

use crate::data;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Echoes every byte back; on the client's end-of-stream, finishes and shuts down its side.
pub async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Reads until the client's end-of-stream, then answers with the hash of what it got (64 hex
/// characters) followed by `reply_len` bytes of stream `reply_seed`, and closes. A client sees
/// the reply only if its half-close crossed the stack and the way back stayed open.
pub async fn reply_after_eof(reply_seed: u64, reply_len: u64) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let Ok((_, hash)) = data::receive(&mut r).await else {
                    return;
                };
                if w.write_all(hash.as_bytes()).await.is_err() {
                    return;
                }
                let _ = data::send(&mut w, reply_seed, reply_len).await;
            });
        }
    });
    addr
}

/// A generic WebSocket server (not backhaul's backend): it picks the last subprotocol offered, first
/// sends the request path and query it saw as a text message, then echoes text and binary
/// messages, with a few commands:
/// - text `ping-me`: it sends a Ping with payload `srv`;
/// - any Ping it receives: it reports `ping-seen:<payload>` as text;
/// - text `close-me`: it closes with code 4000 and reason `bye`.
#[allow(clippy::result_large_err)] // tungstenite's callback signature
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut path = String::new();
                let cb = |req: &Request, mut resp: Response| {
                    path = req.uri().to_string();
                    // Choose the last subprotocol offered, so a test can tell it was ours.
                    let last = req
                        .headers()
                        .get("Sec-WebSocket-Protocol")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(',').map(str::trim).next_back())
                        .and_then(|p| p.parse().ok());
                    if let Some(v) = last {
                        resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                if ws.send(Message::Text(path.into())).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) if t.as_str() == "ping-me" => {
                            Message::Ping(bytes::Bytes::from_static(b"srv"))
                        }
                        Message::Text(t) if t.as_str() == "close-me" => {
                            Message::Close(Some(CloseFrame {
                                code: CloseCode::from(4000),
                                reason: "bye".into(),
                            }))
                        }
                        Message::Ping(p) => Message::Text(
                            format!("ping-seen:{}", String::from_utf8_lossy(&p)).into(),
                        ),
                        m @ (Message::Text(_) | Message::Binary(_)) => m,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A chat broker, like `ncat --broker` (sockets-rust's demo): every line a client sends goes to
/// every other client. A client that joins gets the line `welcome`, and the others `joined`, so
/// a test knows who is there before it talks.
pub async fn broker() -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::sync::broadcast;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind broker");
    let addr = l.local_addr().expect("addr");
    let (tx, _) = broadcast::channel::<(u64, String)>(64);
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((s, _)) = l.accept().await {
            next_id += 1;
            let id = next_id;
            let (tx, mut rx) = (tx.clone(), tx.subscribe());
            let _ = tx.send((id, "joined".into()));
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                if w.write_all(b"welcome\n").await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(r).lines();
                loop {
                    tokio::select! {
                        line = lines.next_line() => match line {
                            Ok(Some(line)) => { let _ = tx.send((id, line)); }
                            _ => return,
                        },
                        msg = rx.recv() => match msg {
                            Ok((from, line)) if from != id => {
                                if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        },
                    }
                }
            });
        }
    });
    addr
}
