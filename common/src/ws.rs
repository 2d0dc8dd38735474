//! The WebSocket of a session, at the level of frames, as a tunnel needs it.
//!
//! A WebSocket library written for endpoints answers pings itself, answers a Close at once, and
//! refuses close codes it does not know. A tunnel must do none of that: pings travel to the far
//! end and only the far end answers, a Close is answered when the far end answers it (so the
//! messages the far end sends meanwhile still arrive, RFC 6455 5.5.1), and every close code a
//! peer may legally send arrives unchanged. So the session sockets of all four programs speak
//! WebSocket frames through this module; tungstenite still does the agent link, whose
//! semantics are backhaul's own.
//!
//! [`Decoder`] is IO-free: it takes bytes and hands out [`Event`]s. Data messages come out in
//! pieces as their bytes arrive (a piece is never larger than the caller asks), so a large
//! message never has to be held whole: memory per connection is one read buffer, whatever the
//! message size. [`WsReader`] and [`WsWriter`] are thin async shells around it.

use crate::lazy_read::{LazyRead, LAZY_READ_CHUNK};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Largest payload of a control frame (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: a close payload is the 2-byte code and the reason.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Payloads up to this size are copied next to their header and written in one call; larger
/// ones are written with the header as a vectored write, without a copy.
const COPY_BELOW: usize = 4 * 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Which end of the WebSocket we are: clients mask what they send, servers must not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// Close codes a peer may put in a Close frame (RFC 6455 7.4 and the IANA registry): 1000-1003,
/// 1007-1014 and the ranges for libraries and applications, 3000-4999. The others (1004-1006,
/// 1015, unassigned) must never be sent.
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// What a peer sent, as far as a tunnel cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A piece of a data message. `fin` ends the message; an empty message is one empty piece
    /// with `fin` set.
    Data {
        text: bool,
        fin: bool,
        payload: Bytes,
    },
    Ping(Bytes),
    Pong(Bytes),
    /// A Close with its code and reason, or `None` for a Close without a status code.
    Close(Option<(u16, String)>),
}

/// Why the peer's bytes were refused. [`WsError::close_code`] is the code to send it.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("message larger than the limit of {limit} bytes")]
    TooBig { limit: u64 },
    #[error("close reason is not UTF-8")]
    BadUtf8,
    #[error("connection ended without a close handshake")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl WsError {
    /// The close code that tells the peer what it did wrong; `None` when it cannot be told.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::TooBig { .. } => Some(1009),
            WsError::BadUtf8 => Some(1007),
            WsError::Eof | WsError::Io(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for a frame header.
    Header,
    /// Inside the payload of a data frame.
    Payload {
        remaining: u64,
        fin: bool,
        mask: Option<[u8; 4]>,
        /// Bytes of this frame's payload already handed out (for the mask's phase).
        done: u64,
    },
}

/// Decodes a peer's frames, checking the rules a tunnel must hold its peers to. IO-free.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_message: u64,
    state: State,
    /// The data message in progress: whether it is text, and its bytes so far.
    message: Option<(bool, u64)>,
}

impl Decoder {
    /// A decoder for the frames our peer sends, when we are `role`, refusing data messages over
    /// `max_message` bytes.
    pub fn new(role: Role, max_message: u64) -> Self {
        Self {
            role,
            max_message,
            state: State::Header,
            message: None,
        }
    }

    /// The next event from the front of `buf`, consuming its bytes; `Ok(None)` until more bytes
    /// are needed. Data pieces are at most `max_piece` bytes; their payload is unmasked in place
    /// and split off `buf` without a copy. An error consumes nothing and changes no state, so a
    /// refused stream stays refused: asked again, the decoder refuses again.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_piece: usize,
    ) -> Result<Option<Event>, WsError> {
        loop {
            match self.state {
                State::Header => {
                    let Some((fin, opcode, len, mask, header_len)) = parse_header(buf)? else {
                        return Ok(None);
                    };
                    match self.role {
                        Role::Server if mask.is_none() => {
                            return Err(WsError::Protocol("client sent an unmasked frame"))
                        }
                        Role::Client if mask.is_some() => {
                            return Err(WsError::Protocol("server sent a masked frame"))
                        }
                        _ => {}
                    }
                    if opcode >= 0x8 {
                        // Control frame: wait until it is whole (at most 125 bytes), and check
                        // it (a copy) before consuming it, so a bad Close stays refused.
                        let end = header_len + len as usize;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        let mut payload = BytesMut::from(&buf[header_len..end]);
                        if let Some(m) = mask {
                            apply_mask(&mut payload, m, 0);
                        }
                        let event = control_event(opcode, payload.freeze())?;
                        buf.advance(end);
                        return Ok(Some(event));
                    }
                    let text = match (opcode, self.message) {
                        (OP_CONTINUATION, Some((text, _))) => text,
                        (OP_CONTINUATION, None) => {
                            return Err(WsError::Protocol("continuation frame outside a message"))
                        }
                        (_, Some(_)) => {
                            return Err(WsError::Protocol("new message before the last one ended"))
                        }
                        (op, None) => op == OP_TEXT,
                    };
                    let so_far = self.message.map_or(0, |(_, n)| n);
                    if so_far.saturating_add(len) > self.max_message {
                        return Err(WsError::TooBig {
                            limit: self.max_message,
                        });
                    }
                    buf.advance(header_len);
                    self.message = Some((text, so_far + len));
                    self.state = State::Payload {
                        remaining: len,
                        fin,
                        mask,
                        done: 0,
                    };
                    if len == 0 {
                        self.state = State::Header;
                        if fin {
                            self.message = None;
                            return Ok(Some(Event::Data {
                                text,
                                fin: true,
                                payload: Bytes::new(),
                            }));
                        }
                        // An empty fragment that does not end its message says nothing.
                    }
                }
                State::Payload {
                    remaining,
                    fin,
                    mask,
                    done,
                } => {
                    let n = (remaining.min(max_piece.max(1) as u64) as usize).min(buf.len());
                    if n == 0 {
                        return Ok(None);
                    }
                    let mut payload = buf.split_to(n);
                    if let Some(m) = mask {
                        apply_mask(&mut payload, m, (done % 4) as usize);
                    }
                    let remaining = remaining - n as u64;
                    let text = self.message.is_some_and(|(t, _)| t);
                    let last = remaining == 0 && fin;
                    if remaining == 0 {
                        self.state = State::Header;
                        if fin {
                            self.message = None;
                        }
                    } else {
                        self.state = State::Payload {
                            remaining,
                            fin,
                            mask,
                            done: done + n as u64,
                        };
                    }
                    return Ok(Some(Event::Data {
                        text,
                        fin: last,
                        payload: payload.freeze(),
                    }));
                }
            }
        }
    }
}

impl Decoder {
    /// Bytes the data frame at the front of `buf` takes (header and payload), or what is left of
    /// the one being read: how much a reader must hold to decode it whole. `None` when that is
    /// not known yet, for control frames (decoded whole anyway), and for a frame over the limit
    /// (which [`Decoder::decode`] refuses without reading it).
    pub fn frame_bytes(&self, buf: &[u8]) -> Result<Option<usize>, WsError> {
        match self.state {
            State::Payload { remaining, .. } => Ok(usize::try_from(remaining).ok()),
            State::Header => {
                let Some((_, opcode, len, _, header_len)) = parse_header(buf)? else {
                    return Ok(None);
                };
                let so_far = self.message.map_or(0, |(_, n)| n);
                if opcode >= 0x8 || so_far.saturating_add(len) > self.max_message {
                    return Ok(None);
                }
                Ok(usize::try_from(len).ok().map(|l| l + header_len))
            }
        }
    }
}

/// Parses the frame header at the front of `buf` without consuming it: `(fin, opcode, payload
/// length, mask, header length)`, or `None` until it is whole.
#[allow(clippy::type_complexity)]
fn parse_header(buf: &[u8]) -> Result<Option<(bool, u8, u64, Option<[u8; 4]>, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without an extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Protocol("unknown opcode"));
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WsError::Protocol("frame length has its top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= 0x8 {
        if !fin {
            return Err(WsError::Protocol("fragmented control frame"));
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(WsError::Protocol("control frame over 125 bytes"));
        }
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some((fin, opcode, len, mask, at)))
}

fn control_event(opcode: u8, payload: Bytes) -> Result<Event, WsError> {
    Ok(match opcode {
        OP_PING => Event::Ping(payload),
        OP_PONG => Event::Pong(payload),
        _ => Event::Close(parse_close(&payload)?),
    })
}

/// Checks a Close payload: empty, or a sendable code and a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_sendable_close_code(code) {
                return Err(WsError::Protocol("close code that must not be sent"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| WsError::BadUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

/// XORs `data` with `mask`, starting at `phase` bytes into the mask's cycle.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], phase: usize) {
    let mut key = [0u8; 8];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(phase + i) % 4];
    }
    let word = u64::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// Writes a frame header into `out`.
fn put_header(out: &mut BytesMut, fin: bool, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.put_u8(if fin { 0x80 } else { 0 } | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match len {
        0..=125 => out.put_u8(m | len as u8),
        126..=0xFFFF => {
            out.put_u8(m | 126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(m | 127);
            out.put_u64(len as u64);
        }
    }
    if let Some(k) = mask {
        out.put_slice(&k);
    }
}

/// The Close payload for `code` and `reason`, the reason cut to what a Close can hold.
pub fn close_payload(close: Option<(u16, &str)>) -> Bytes {
    let Some((code, reason)) = close else {
        return Bytes::new();
    };
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = BytesMut::with_capacity(2 + end);
    b.put_u16(code);
    b.put_slice(&reason.as_bytes()[..end]);
    b.freeze()
}

/// The `Sec-WebSocket-Key` of a WebSocket upgrade request, if it is one.
pub fn websocket_key<B>(req: &http::Request<B>) -> Option<http::HeaderValue> {
    let is_upgrade = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    is_upgrade
        .then(|| req.headers().get(http::header::SEC_WEBSOCKET_KEY).cloned())
        .flatten()
}

/// The 101 answer accepting a WebSocket with `key`, naming `protocol` if one was chosen.
/// Offered extensions (permessage-deflate) are declined by not naming them.
pub fn switching_protocols<B: Default>(
    key: &http::HeaderValue,
    protocol: Option<String>,
) -> http::Response<B> {
    use http::{header, HeaderValue};
    let mut resp = http::Response::new(B::default());
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    resp
}

/// Reads a peer's frames from `R`. Holds a read buffer only while bytes are waiting in it.
#[derive(Debug)]
pub struct WsReader<R> {
    src: LazyRead<R>,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    pub fn new(io: R, role: Role, max_message: u64) -> Self {
        Self {
            src: LazyRead::new(io),
            decoder: Decoder::new(role, max_message),
        }
    }

    /// The next event, with data pieces of at most `max_piece` bytes. Cancel-safe: a partly
    /// read frame stays in the buffer.
    pub async fn next(&mut self, max_piece: usize) -> Result<Event, WsError> {
        loop {
            if let Some(ev) = self.decoder.decode(self.src.buffer(), max_piece)? {
                return Ok(ev);
            }
            if self.src.fill().await? == 0 {
                return Err(WsError::Eof);
            }
        }
    }

    /// The next event, each data frame whole: its bytes are read into one buffer and its payload
    /// split off it without a copy. For peers whose messages are units of work (the agent
    /// link's batches, one frame each), where a piece is of no use alone. The buffer is bounded
    /// by the decoder's message limit.
    pub async fn next_whole_frame(&mut self) -> Result<Event, WsError> {
        loop {
            let buf = self.src.buffer();
            if let Some(need) = self.decoder.frame_bytes(buf)? {
                if buf.len() < need {
                    buf.reserve(need - buf.len());
                    if self.src.fill().await? == 0 {
                        return Err(WsError::Eof);
                    }
                    continue;
                }
            }
            if let Some(ev) = self.decoder.decode(self.src.buffer(), usize::MAX)? {
                return Ok(ev);
            }
            if self.src.fill().await? == 0 {
                return Err(WsError::Eof);
            }
        }
    }

    /// Reads and discards whatever the peer still sends, until it closes the connection or
    /// `limit` passes. For the end of a close handshake.
    pub async fn drain(&mut self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, async {
            while let Ok(chunk) = self.src.read_chunk(LAZY_READ_CHUNK).await {
                if chunk.is_empty() {
                    break;
                }
            }
        })
        .await;
    }
}

/// Writes frames to `W`, fragmenting messages as the pieces come.
#[derive(Debug)]
pub struct WsWriter<W> {
    io: W,
    role: Role,
    /// A data message has begun and not ended: the next piece is a continuation.
    in_message: bool,
    closed: bool,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub fn new(io: W, role: Role) -> Self {
        Self {
            io,
            role,
            in_message: false,
            closed: false,
        }
    }

    /// Sends a piece of a data message; `fin` ends the message.
    pub async fn data(&mut self, text: bool, fin: bool, payload: &Bytes) -> io::Result<()> {
        let opcode = match (self.in_message, text) {
            (true, _) => OP_CONTINUATION,
            (false, true) => OP_TEXT,
            (false, false) => OP_BINARY,
        };
        self.in_message = !fin;
        self.frame(fin, opcode, payload).await
    }

    /// Sends one whole binary message made of `parts`, in one frame. A server writes the parts
    /// as they are, with vectored writes; a client masks them into one buffer (one copy, which
    /// masking needs anyway).
    pub async fn binary_parts(&mut self, parts: &[Bytes]) -> io::Result<()> {
        if self.closed || self.in_message {
            return Err(io::Error::other(
                "a whole message while another was sent or closed",
            ));
        }
        let len = parts.iter().map(Bytes::len).sum();
        let mask = (self.role == Role::Client).then(rand::random::<[u8; 4]>);
        let mut head = BytesMut::with_capacity(14);
        put_header(&mut head, true, OP_BINARY, len, mask);
        if let Some(m) = mask {
            let start = head.len();
            head.reserve(len);
            for p in parts {
                head.extend_from_slice(p);
            }
            apply_mask(&mut head[start..], m, 0);
            self.io.write_all(&head).await?;
        } else {
            let mut all = Vec::with_capacity(parts.len() + 1);
            all.push(&head[..]);
            all.extend(parts.iter().map(|p| &p[..]));
            write_all_vectored(&mut self.io, &all).await?;
        }
        self.io.flush().await
    }

    pub async fn ping(&mut self, payload: &Bytes) -> io::Result<()> {
        self.frame(true, OP_PING, &control(payload)).await
    }

    pub async fn pong(&mut self, payload: &Bytes) -> io::Result<()> {
        self.frame(true, OP_PONG, &control(payload)).await
    }

    /// Sends a Close (once; later calls do nothing). Codes that must not be sent become 1011,
    /// and a Close inside an unfinished message is still sent: control frames may come between
    /// fragments.
    pub async fn close(&mut self, close: Option<(u16, &str)>) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let close = close.map(|(c, r)| (if is_sendable_close_code(c) { c } else { 1011 }, r));
        self.frame(true, OP_CLOSE, &close_payload(close)).await
    }

    /// Which end of the WebSocket this writer is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether a Close has been sent.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Shuts down the sending side of the connection.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }

    async fn frame(&mut self, fin: bool, opcode: u8, payload: &Bytes) -> io::Result<()> {
        if self.closed && opcode != OP_CLOSE {
            return Err(io::Error::other("frame after our Close"));
        }
        let mask = (self.role == Role::Client).then(rand::random::<[u8; 4]>);
        let mut head = BytesMut::with_capacity(14 + payload.len().min(COPY_BELOW));
        put_header(&mut head, fin, opcode, payload.len(), mask);
        if let Some(m) = mask {
            // A client's payload must be masked: one copy, into the header's buffer.
            let start = head.len();
            head.extend_from_slice(payload);
            apply_mask(&mut head[start..], m, 0);
            self.io.write_all(&head).await?;
        } else if payload.len() < COPY_BELOW {
            head.extend_from_slice(payload);
            self.io.write_all(&head).await?;
        } else {
            write_all_vectored(&mut self.io, &[&head, payload]).await?;
        }
        self.io.flush().await
    }
}

/// A control frame's payload, cut to the 125 bytes it may hold.
fn control(payload: &Bytes) -> Bytes {
    payload.slice(..payload.len().min(MAX_CONTROL_PAYLOAD))
}

/// Writes `bufs` one after another with vectored writes, without joining them.
async fn write_all_vectored<W: AsyncWrite + Unpin>(io: &mut W, bufs: &[&[u8]]) -> io::Result<()> {
    /// Buffers handed to one system call (the kernel's limit is 1024).
    const MAX_SLICES: usize = 64;
    let mut slices: Vec<io::IoSlice<'_>> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| io::IoSlice::new(b))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = io
            .write_vectored(&rest[..rest.len().min(MAX_SLICES)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as a client would send them (masked with a fixed key), for the server's decoder.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = BytesMut::new();
        put_header(&mut out, fin, opcode, payload.len(), Some(key));
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], key, 0);
        out.to_vec()
    }

    fn all_events(d: &mut Decoder, bytes: &[u8], piece: usize) -> Result<Vec<Event>, WsError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(ev) = d.decode(&mut buf, piece)? {
            out.push(ev);
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        Ok(out)
    }

    #[test]
    fn rfc_6455_examples_decode() {
        // RFC 6455 5.7: a single-frame masked text message "Hello".
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut d = Decoder::new(Role::Server, 1 << 20);
        assert_eq!(
            all_events(&mut d, &bytes, 1024).unwrap(),
            vec![Event::Data {
                text: true,
                fin: true,
                payload: Bytes::from_static(b"Hello")
            }]
        );
        // A fragmented unmasked text message "Hel" + "lo", with a ping between, to a client.
        let bytes = [
            0x01, 0x03, 0x48, 0x65, 0x6c, 0x89, 0x02, b'h', b'i', 0x80, 0x02, 0x6c, 0x6f,
        ];
        let mut d = Decoder::new(Role::Client, 1 << 20);
        let evs = all_events(&mut d, &bytes, 1024).unwrap();
        assert_eq!(
            evs,
            vec![
                Event::Data {
                    text: true,
                    fin: false,
                    payload: Bytes::from_static(b"Hel")
                },
                Event::Ping(Bytes::from_static(b"hi")),
                Event::Data {
                    text: true,
                    fin: true,
                    payload: Bytes::from_static(b"lo")
                },
            ]
        );
    }

    #[test]
    fn bytes_arriving_one_at_a_time_give_the_same_events_in_pieces() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 31) as u8).collect();
        let mut wire = client_frame(false, OP_BINARY, &payload[..40_000]);
        wire.extend(client_frame(true, OP_PING, b"p"));
        wire.extend(client_frame(true, OP_CONTINUATION, &payload[40_000..]));
        wire.extend(client_frame(
            true,
            OP_CLOSE,
            &[0x03, 0xf6, b'b', b'y', b'e'],
        ));
        let mut d = Decoder::new(Role::Server, 1 << 20);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut others = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(ev) = d.decode(&mut buf, 1000).unwrap() {
                match ev {
                    Event::Data { text, fin, payload } => {
                        assert!(!text && payload.len() <= 1000);
                        data.extend_from_slice(&payload);
                        if fin {
                            others.push(Event::Pong(Bytes::from_static(b"end")));
                        }
                    }
                    ev => others.push(ev),
                }
            }
        }
        assert_eq!(data, payload);
        assert_eq!(
            others,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Pong(Bytes::from_static(b"end")),
                Event::Close(Some((1014, "bye".into()))),
            ]
        );
    }

    #[test]
    fn every_sendable_close_code_decodes_and_the_rest_are_refused() {
        for code in 0..=u16::MAX {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(b"why");
            let r = parse_close(&payload);
            if is_sendable_close_code(code) {
                assert_eq!(r.unwrap(), Some((code, "why".into())), "code {code}");
            } else {
                assert_eq!(r.unwrap_err().close_code(), Some(1002), "code {code}");
            }
        }
        assert_eq!(parse_close(&[]).unwrap(), None);
        assert_eq!(parse_close(&[3]).unwrap_err().close_code(), Some(1002));
        assert_eq!(
            parse_close(&[0x03, 0xe8, 0xff]).unwrap_err().close_code(),
            Some(1007)
        );
    }

    #[test]
    fn broken_frames_are_refused_with_the_right_code() {
        let cases: Vec<(Role, Vec<u8>, u16)> = vec![
            // unmasked frame from a client
            (Role::Server, vec![0x82, 0x01, 0x00], 1002),
            // masked frame from a server
            (Role::Client, client_frame(true, OP_BINARY, b"x"), 1002),
            // reserved bit
            (Role::Client, vec![0xC2, 0x00], 1002),
            // unknown opcode
            (Role::Client, vec![0x83, 0x00], 1002),
            // fragmented ping
            (Role::Client, vec![0x09, 0x00], 1002),
            // control frame over 125 bytes
            (Role::Client, vec![0x89, 126, 0, 126], 1002),
            // continuation with no message
            (Role::Client, vec![0x80, 0x00], 1002),
            // a new message inside a fragmented one
            (Role::Client, vec![0x02, 0x00, 0x82, 0x00], 1002),
            // 64-bit length with the top bit set
            (
                Role::Client,
                vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0],
                1002,
            ),
            // over the message limit, refused at the header before the payload arrives
            (Role::Client, vec![0x82, 126, 0x04, 0x01], 1009),
            // over the limit across fragments
            (
                Role::Client,
                [
                    vec![0x02, 126, 0x02, 0x00],
                    vec![0; 512],
                    vec![0x80, 126, 0x02, 0x01],
                ]
                .concat(),
                1009,
            ),
        ];
        for (role, bytes, code) in cases {
            let mut d = Decoder::new(role, 1024);
            let mut buf = BytesMut::from(&bytes[..]);
            let err = loop {
                match d.decode(&mut buf, 4096) {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("{bytes:02x?} was accepted"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.close_code(), Some(code), "{bytes:02x?}: {err}");
        }
    }

    #[test]
    fn a_refused_close_stays_refused() {
        // Found by fuzz/fuzz_targets/ws_decoder.rs: a bad Close was consumed with its error, so
        // the decoder, asked again, read on past it.
        let good = [0x82, 0x01, b'x'];
        for bad in [
            &[0x88, 0x01, 0x88][..],             // one-byte payload
            &[0x88, 0x03, 0x03, 0xe8, 0xff][..], // reason not UTF-8
            &[0x88, 0x02, 0x03, 0xee][..],       // 1006: must not be sent
        ] {
            let mut d = Decoder::new(Role::Client, 1024);
            let mut buf = BytesMut::from(bad);
            assert!(d.decode(&mut buf, 4096).is_err(), "{bad:02x?}");
            assert_eq!(&buf[..], bad, "the refused frame was consumed");
            buf.extend_from_slice(&good);
            assert!(
                d.decode(&mut buf, 4096).is_err(),
                "{bad:02x?} then accepted"
            );
        }
    }

    #[tokio::test]
    async fn writer_and_reader_round_trip_both_roles() {
        for (w_role, r_role) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
            let (a, b) = tokio::io::duplex(1 << 16);
            let mut w = WsWriter::new(a, w_role);
            let mut r = WsReader::new(b, r_role, 1 << 24);
            let big = Bytes::from((0..300_000u32).map(|i| i as u8).collect::<Vec<_>>());
            let writer = tokio::spawn(async move {
                w.data(false, false, &big.slice(..100)).await.unwrap();
                w.ping(&Bytes::from_static(b"x")).await.unwrap();
                w.data(false, true, &big.slice(100..)).await.unwrap();
                w.data(true, true, &Bytes::from_static("é".as_bytes()))
                    .await
                    .unwrap();
                w.data(false, true, &Bytes::new()).await.unwrap();
                w.close(Some((1014, "bad gateway"))).await.unwrap();
                assert!(w.data(false, true, &Bytes::new()).await.is_err());
                big
            });
            let mut got = Vec::new();
            loop {
                match r.next(65536).await.unwrap() {
                    Event::Data {
                        text: false,
                        fin,
                        payload,
                    } => {
                        got.extend_from_slice(&payload);
                        if fin {
                            break;
                        }
                    }
                    Event::Ping(p) => assert_eq!(&p[..], b"x"),
                    other => panic!("unexpected {other:?}"),
                }
            }
            let big = writer.await.unwrap();
            assert_eq!(got, big);
            assert_eq!(
                r.next(65536).await.unwrap(),
                Event::Data {
                    text: true,
                    fin: true,
                    payload: Bytes::from_static("é".as_bytes())
                }
            );
            assert_eq!(
                r.next(65536).await.unwrap(),
                Event::Data {
                    text: false,
                    fin: true,
                    payload: Bytes::new()
                }
            );
            assert_eq!(
                r.next(65536).await.unwrap(),
                Event::Close(Some((1014, "bad gateway".into())))
            );
            assert!(matches!(r.next(65536).await, Err(WsError::Eof)));
        }
    }

    #[test]
    fn masking_matches_byte_by_byte_at_every_phase() {
        let key = [1, 2, 3, 4];
        for phase in 0..4 {
            let mut data: Vec<u8> = (0..37u8).collect();
            apply_mask(&mut data, key, phase);
            for (i, b) in data.iter().enumerate() {
                assert_eq!(*b, (i as u8) ^ key[(phase + i) % 4]);
            }
        }
    }

    /// Whole messages written from parts arrive whole, in one piece, for both roles, even when
    /// the connection carries them a few bytes at a time; a frame over the limit is refused
    /// before its bytes are read.
    #[tokio::test]
    async fn whole_frames_from_parts_arrive_in_one_piece() {
        for role in [Role::Client, Role::Server] {
            let peer = if role == Role::Client {
                Role::Server
            } else {
                Role::Client
            };
            // A pipe smaller than the messages: they arrive in many reads.
            let (a, b) = tokio::io::duplex(1000);
            let mut w = WsWriter::new(a, role);
            let mut r = WsReader::new(b, peer, 300_000);
            let parts: Vec<Bytes> = (0..5u32)
                .map(|i| Bytes::from(vec![i as u8; 10_000 * i as usize + 3]))
                .collect();
            let want: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
            let writer = tokio::spawn(async move {
                w.binary_parts(&parts).await.unwrap();
                w.binary_parts(&[]).await.unwrap();
                w.ping(&Bytes::from_static(b"p")).await.unwrap();
                w.binary_parts(&[Bytes::from(vec![7u8; 300_001])]).await
            });
            let ev = r.next_whole_frame().await.unwrap();
            assert_eq!(
                ev,
                Event::Data {
                    text: false,
                    fin: true,
                    payload: Bytes::from(want)
                }
            );
            let ev = r.next_whole_frame().await.unwrap();
            assert!(matches!(ev, Event::Data { fin: true, payload, .. } if payload.is_empty()));
            assert_eq!(
                r.next_whole_frame().await.unwrap(),
                Event::Ping(Bytes::from_static(b"p"))
            );
            assert!(matches!(
                r.next_whole_frame().await,
                Err(WsError::TooBig { limit: 300_000 })
            ));
            drop(r);
            assert!(writer.await.unwrap().is_err(), "the reader gave up");
        }
    }
}
