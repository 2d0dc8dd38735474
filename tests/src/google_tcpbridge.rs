//! The two halves of Google's tcp-bridge (github.com/google/inverting-proxy, utils/tcpbridge),
//! for the interoperability tests.
//!
//! CI cannot fetch Google's source, so by default these are a re-implementation of its framing
//! on tungstenite (a different WebSocket library from backhaul's), following what the Go
//! programs do: bytes as lower-case hex in text messages of at most 32 KiB of data, binary
//! messages ignored, no end-of-stream signal, the backend serving only its fixed path and
//! dialing one fixed port, and a session torn down by dropping the connection without a Close.
//! With `BACKHAUL_GOOGLE_TCPBRIDGE_BIN` naming a directory holding Google's own
//! `tcp-bridge-frontend` and `tcp-bridge-backend` (built with Go), the tests run those instead.

use crate::READY_TIMEOUT;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The path Google's backend serves and its frontend asks for.
pub const PATH: &str = "/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96";

/// One half, running: the address it accepts on, and the Go process if it is Google's own.
pub struct Half {
    pub addr: SocketAddr,
    _process: Option<tokio::process::Child>,
}

/// Google's real programs, if `BACKHAUL_GOOGLE_TCPBRIDGE_BIN` names them.
fn real_programs() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("BACKHAUL_GOOGLE_TCPBRIDGE_BIN")?);
    assert!(
        dir.join("tcp-bridge-frontend").exists() && dir.join("tcp-bridge-backend").exists(),
        "BACKHAUL_GOOGLE_TCPBRIDGE_BIN={} holds no tcp-bridge-frontend and tcp-bridge-backend",
        dir.display()
    );
    Some(dir)
}

/// Whether the tests run Google's own programs.
pub fn using_real_programs() -> bool {
    real_programs().is_some()
}

/// A free port on loopback (bound, then released: the Go programs take only a port number).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts a Go program that listens on `port` and waits until it accepts connections.
async fn start_go(dir: &std::path::Path, name: &str, args: &[String], port: u16) -> Half {
    let process = tokio::process::Command::new(dir.join(name))
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} did not listen on {port}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Half {
        addr,
        _process: Some(process),
    }
}

/// Google's backend: a WebSocket server at [`PATH`] whose sessions each dial `target`.
#[allow(clippy::result_large_err)] // tungstenite's handshake callback signature
pub async fn backend(target: SocketAddr) -> Half {
    if let Some(dir) = real_programs() {
        let port = free_port();
        let args = vec![
            "-frontend-port".to_string(),
            port.to_string(),
            "-backend-port".to_string(),
            target.port().to_string(),
        ];
        return start_go(&dir, "tcp-bridge-backend", &args, port).await;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let check = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             resp| {
                    if req.uri().path() == PATH {
                        Ok(resp)
                    } else {
                        let mut refuse = tokio_tungstenite::tungstenite::http::Response::new(None);
                        *refuse.status_mut() =
                            tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                        Err(refuse)
                    }
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(s, check).await else {
                    return;
                };
                // Like Google's: the 101 first, then the dial; a failed dial drops the socket.
                let Ok(tcp) = TcpStream::connect(target).await else {
                    return;
                };
                bridge(ws, tcp).await;
            });
        }
    });
    Half {
        addr,
        _process: None,
    }
}

/// Google's frontend: accepts TCP and carries each connection to `backend_url` + [`PATH`].
pub async fn frontend(backend_url: &str) -> Half {
    if let Some(dir) = real_programs() {
        let port = free_port();
        let args = vec![
            "-frontend-port".to_string(),
            port.to_string(),
            "-backend".to_string(),
            backend_url.to_string(),
        ];
        return start_go(&dir, "tcp-bridge-frontend", &args, port).await;
    }
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let url = format!("{}{PATH}", backend_url.trim_end_matches('/'));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let url = url.clone();
            tokio::spawn(async move {
                if let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await {
                    bridge(ws, tcp).await;
                }
            });
        }
    });
    Half {
        addr,
        _process: None,
    }
}

/// The two copy loops of Google's `connection` package; when both have stopped, both sockets
/// are dropped (the WebSocket without a Close).
async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, tcp: TcpStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match tcp_r.read(&mut buf).await {
                Ok(0) | Err(_) => return, // no end-of-stream signal in this framing
                Ok(n) => {
                    let text = hex::encode(&buf[..n]);
                    if ws_tx.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Text(t) => match hex::decode(t.as_bytes()) {
                    Ok(bytes) => {
                        if tcp_w.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return, // invalid hex silently stops this direction
                },
                Message::Close(_) => {
                    // Google's (gorilla's) close handler echoes the Close at once; reading on
                    // makes tungstenite send its echo.
                    let _ = ws_rx.next().await;
                    return;
                }
                _ => {}
            }
        }
    };
    tokio::join!(up, down);
}
