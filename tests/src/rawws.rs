//! WebSocket at the byte level, for tests that must see exactly what crosses the wire: close
//! codes a library would rewrite, pings a library would answer, the order of frames around a
//! Close. Written apart from `backhaul_common::ws` (and simpler: whole frames, no streaming) so
//! the two cannot share a mistake.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Longest wait for one frame or handshake.
const WAIT: Duration = Duration::from_secs(20);

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// One end of a WebSocket, frames in and out as raw bytes.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Clients mask what they send.
    client: bool,
}

/// A frame as read: (fin, opcode, payload).
pub type RawFrame = (bool, u8, Vec<u8>);

async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            return (head, buf[end + 4..].to_vec());
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("handshake within the wait")
            .expect("read handshake");
        assert!(
            n > 0,
            "connection closed during the handshake: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in an HTTP head, case-insensitively.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl RawWs {
    /// Opens a WebSocket to `addr` for `target` with extra header lines; returns the socket and
    /// the server's response head, or just the head when the server refused the upgrade.
    pub async fn connect(
        addr: SocketAddr,
        target: &str,
        extra: &[(&str, &str)],
    ) -> Result<(RawWs, String), String> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, addr, target, extra).await
    }

    /// Like [`RawWs::connect`], from the local address `from` (any 127.x.y.z works on Linux's
    /// loopback), so a test can stand for a second client machine.
    pub async fn connect_from(
        from: IpAddr,
        addr: SocketAddr,
        target: &str,
        extra: &[(&str, &str)],
    ) -> Result<(RawWs, String), String> {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(from, 0))
            .expect("bind the client address");
        let stream = socket.connect(addr).await.expect("connect");
        Self::handshake(stream, addr, target, extra).await
    }

    async fn handshake(
        mut stream: TcpStream,
        addr: SocketAddr,
        target: &str,
        extra: &[(&str, &str)],
    ) -> Result<(RawWs, String), String> {
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send handshake");
        let (head, rest) = read_head(&mut stream).await;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        // RFC 6455 1.3's example key and its answer.
        assert_eq!(
            header(&head, "sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        Ok((
            RawWs {
                stream,
                buf: rest,
                client: true,
            },
            head,
        ))
    }

    /// Accepts one WebSocket on `listener`; returns it and the client's request head.
    pub async fn accept(listener: &TcpListener) -> (RawWs, String) {
        let (mut stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("a connection within the wait")
            .expect("accept");
        let (head, rest) = read_head(&mut stream).await;
        let key = header(&head, "sec-websocket-key")
            .expect("a WebSocket key")
            .to_string();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(resp.as_bytes()).await.expect("send 101");
        (
            RawWs {
                stream,
                buf: rest,
                client: false,
            },
            head,
        )
    }

    /// Sends one frame.
    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let out = encode(fin, opcode, payload, self.client);
        self.stream.write_all(&out).await.expect("send frame");
    }

    /// The socket and any bytes already read past the handshake, for a test that drives the
    /// two directions separately (a flood writer and a reader).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Sends a Close with `code` and `reason`.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        self.send(true, CLOSE, &p).await;
    }

    async fn fill(&mut self, want: usize) -> bool {
        let mut chunk = [0u8; 65536];
        while self.buf.len() < want {
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("no frame within {WAIT:?}"),
            };
            if n == 0 {
                return false;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        true
    }

    /// The next frame, or `None` if the connection closed first.
    pub async fn recv(&mut self) -> Option<RawFrame> {
        if !self.fill(2).await {
            return None;
        }
        let (fin, opcode, masked) = (
            self.buf[0] & 0x80 != 0,
            self.buf[0] & 0x0F,
            self.buf[1] & 0x80 != 0,
        );
        let mut at = 2;
        let len = match self.buf[1] & 0x7F {
            126 => {
                self.fill(4).await;
                at = 4;
                u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize
            }
            127 => {
                self.fill(10).await;
                at = 10;
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize
            }
            n => n as usize,
        };
        let key_at = at;
        if masked {
            at += 4;
        }
        if !self.fill(at + len).await {
            return None;
        }
        let mut payload = self.buf[at..at + len].to_vec();
        if masked {
            let key: Vec<u8> = self.buf[key_at..key_at + 4].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        assert_eq!(
            masked, !self.client,
            "frames to a client are unmasked, to a server masked"
        );
        self.buf.drain(..at + len);
        Some((fin, opcode, payload))
    }

    /// The next whole data message (text or binary) and its opcode, skipping nothing: a control
    /// frame before the message ends fails the test.
    pub async fn recv_message(&mut self) -> (u8, Vec<u8>) {
        let (mut fin, opcode, mut data) = self.recv().await.expect("a message");
        assert!(
            matches!(opcode, TEXT | BINARY),
            "expected a data frame, got opcode {opcode} with {:?}",
            String::from_utf8_lossy(&data)
        );
        while !fin {
            let (f, op, more) = self.recv().await.expect("the rest of the message");
            assert_eq!(op, 0, "expected a continuation frame, got opcode {op}");
            fin = f;
            data.extend_from_slice(&more);
        }
        (opcode, data)
    }

    /// The code and reason of the next Close, skipping any other frames before it; `None` if
    /// the connection closed first.
    pub async fn next_close(&mut self) -> Option<(u16, String)> {
        while let Some((_, op, p)) = self.recv().await {
            if op == CLOSE {
                return Some(close_parts(&p));
            }
        }
        None
    }

    /// Whether the peer closes the TCP connection (after any frames, which are discarded)
    /// within the wait.
    pub async fn closes_connection(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

/// One frame as it goes on the wire; `masked` for frames a client sends.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Parses a Close payload into (code, reason).
pub fn close_parts(payload: &[u8]) -> (u16, String) {
    assert!(payload.len() >= 2, "close without a code: {payload:?}");
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        String::from_utf8_lossy(&payload[2..]).to_string(),
    )
}
