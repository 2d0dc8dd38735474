//! The agent link's binary wire format: frames and the batches that carry them. No IO here.
//!
//! Every HTTP body exchanged between agent and relay (a poll response, a push request, a push
//! response) is one *batch*:
//!
//! ```text
//! batch  = version:u8 (=1) | ack:u64 | first_seq:u64 | frame*
//! frame  = kind:u8 | flags:u8 | session:u32 | len:u32 | payload[len]
//! ```
//!
//! All integers are big-endian. `ack` acknowledges the *other* direction: every frame with a
//! sequence number below it has been received. The frames of a batch carry the consecutive
//! sequence numbers `first_seq, first_seq + 1, ...`. See `docs/protocol.md` for the semantics.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Version byte that opens every batch.
pub const VERSION: u8 = 1;
/// Bytes of the batch header: version, ack, first_seq.
pub const BATCH_HEADER_LEN: usize = 1 + 8 + 8;
/// Bytes of a frame header: kind, flags, session, len.
pub const FRAME_HEADER_LEN: usize = 1 + 1 + 4 + 4;
/// Largest DATA chunk a sender produces; messages above it are split into several frames.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Largest payload a decoder accepts for any frame. Bounds the memory one frame can claim.
pub const MAX_FRAME_PAYLOAD: usize = MAX_CHUNK;

/// DATA flag: the message is text (otherwise binary). Set on every chunk of a text message.
pub const FLAG_TEXT: u8 = 0b01;
/// DATA flag: this chunk ends the message.
pub const FLAG_FIN: u8 = 0b10;
/// On a DATA, PING or PONG frame: its sender has too little window left for another full piece
/// (it is window-limited). A receiver that has written out everything may grow the window.
/// Peers that do not know it ignore it.
pub const FLAG_BLOCKED: u8 = 0b100;
/// CLOSE flag: the session ended abnormally; drop the WebSocket without a close handshake.
pub const FLAG_ABORT: u8 = 0b01;

/// What a frame means. The numbers are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// relay -> agent: a new session; payload is the JSON [`crate::api::OpenRequest`].
    Open = 1,
    /// agent -> relay: the backend accepted the session; payload is JSON [`crate::api::Opened`].
    Opened = 2,
    /// A chunk of a WebSocket message (see [`FLAG_TEXT`], [`FLAG_FIN`]).
    Data = 3,
    /// A WebSocket ping with its payload.
    Ping = 4,
    /// A WebSocket pong with its payload.
    Pong = 5,
    /// The session is over: payload is `code:u16 | reason` (or empty for no status code).
    Close = 6,
    /// Flow control: payload is `credit:u32`, bytes of DATA the receiver has consumed.
    Window = 7,
    /// Flow control, the other way: payload is `credit:u32`, window a sender no longer needs
    /// (it was idle with a grown window) and gives back; its receiver shrinks the window by it.
    Return = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Open,
            2 => Kind::Opened,
            3 => Kind::Data,
            4 => Kind::Ping,
            5 => Kind::Pong,
            6 => Kind::Close,
            7 => Kind::Window,
            8 => Kind::Return,
            _ => return None,
        })
    }
}

/// One frame of the agent link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub session: u32,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, flags: u8, session: u32, payload: Bytes) -> Self {
        Self {
            kind,
            flags,
            session,
            payload,
        }
    }

    pub fn data(session: u32, text: bool, fin: bool, payload: Bytes) -> Self {
        let mut flags = 0;
        if text {
            flags |= FLAG_TEXT;
        }
        if fin {
            flags |= FLAG_FIN;
        }
        Self::new(Kind::Data, flags, session, payload)
    }

    /// A CLOSE carrying a WebSocket close code and reason (the reason is cut to the 123 bytes a
    /// WebSocket close frame can hold, on a character boundary).
    pub fn close(session: u32, code: u16, reason: &str) -> Self {
        let reason = truncate_utf8(reason, 123);
        let mut buf = BytesMut::with_capacity(2 + reason.len());
        buf.put_u16(code);
        buf.put_slice(reason.as_bytes());
        Self::new(Kind::Close, 0, session, buf.freeze())
    }

    /// A CLOSE without a status code.
    pub fn close_empty(session: u32) -> Self {
        Self::new(Kind::Close, 0, session, Bytes::new())
    }

    /// A CLOSE telling the peer to drop its WebSocket abruptly (the far side vanished).
    pub fn abort(session: u32, reason: &str) -> Self {
        let mut f = Self::close(session, 1011, reason);
        f.flags = FLAG_ABORT;
        f
    }

    pub fn window(session: u32, credit: u32) -> Self {
        Self::new(
            Kind::Window,
            0,
            session,
            Bytes::copy_from_slice(&credit.to_be_bytes()),
        )
    }

    /// Gives `credit` bytes of window back to the session's receiver (see [`Kind::Return`]).
    pub fn window_return(session: u32, credit: u32) -> Self {
        Self::new(
            Kind::Return,
            0,
            session,
            Bytes::copy_from_slice(&credit.to_be_bytes()),
        )
    }

    pub fn is_text(&self) -> bool {
        self.flags & FLAG_TEXT != 0
    }

    pub fn is_fin(&self) -> bool {
        self.flags & FLAG_FIN != 0
    }

    /// Whether the sender was window-limited after this frame (see [`FLAG_BLOCKED`]).
    pub fn is_blocked(&self) -> bool {
        matches!(self.kind, Kind::Data | Kind::Ping | Kind::Pong) && self.flags & FLAG_BLOCKED != 0
    }

    pub fn is_abort(&self) -> bool {
        self.kind == Kind::Close && self.flags & FLAG_ABORT != 0
    }

    /// Decodes a CLOSE payload into `(code, reason)`; `None` for an empty payload.
    pub fn close_parts(&self) -> Result<Option<(u16, String)>, WireError> {
        if self.payload.is_empty() {
            return Ok(None);
        }
        if self.payload.len() < 2 {
            return Err(WireError::BadPayload("close frame shorter than its code"));
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8_lossy(&self.payload[2..]).into_owned();
        Ok(Some((code, reason)))
    }

    /// Decodes a WINDOW or RETURN payload.
    pub fn window_credit(&self) -> Result<u32, WireError> {
        let bytes: [u8; 4] = self
            .payload
            .as_ref()
            .try_into()
            .map_err(|_| WireError::BadPayload("window frame payload is not 4 bytes"))?;
        Ok(u32::from_be_bytes(bytes))
    }

    /// Bytes this frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload.len()
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_u8(self.kind as u8);
        out.put_u8(self.flags);
        out.put_u32(self.session);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The fields that open every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Every frame of the other direction below this sequence number has been received.
    pub ack: u64,
    /// Sequence number of the batch's first frame (the next one to be sent if it has none).
    pub first_seq: u64,
}

impl BatchHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(BATCH_HEADER_LEN);
        out.put_u8(VERSION);
        out.put_u64(self.ack);
        out.put_u64(self.first_seq);
    }
}

/// Payloads at least this long go out as references to the frame's own bytes; shorter ones are
/// copied next to the headers, where one more buffer would cost more than the copy.
pub const GATHER_FROM: usize = 4 * 1024;

/// An encoded batch as the buffers to write one after another: headers and small payloads
/// share buffers, larger payloads are the frames' own bytes, not copies. A writer hands the
/// parts to a vectored write (or masks them into one buffer, as a WebSocket client must).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    parts: Vec<Bytes>,
    len: usize,
}

impl Batch {
    /// Bytes in the whole batch.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    pub fn into_parts(self) -> Vec<Bytes> {
        self.parts
    }

    /// The batch as one buffer: no copy when it is one part already, one copy otherwise. For
    /// bodies that must be one piece (a long-poll exchange).
    pub fn into_bytes(self) -> Bytes {
        if self.parts.len() == 1 {
            return self.parts.into_iter().next().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(self.len);
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out.freeze()
    }
}

/// Builds a [`Batch`]: a header, then frames.
#[derive(Debug)]
pub struct BatchEncoder {
    done: Batch,
    /// Headers and small payloads not yet closed into a part.
    small: BytesMut,
}

impl BatchEncoder {
    pub fn new(header: BatchHeader) -> Self {
        let mut small = BytesMut::with_capacity(GATHER_FROM);
        header.encode(&mut small);
        Self {
            done: Batch::default(),
            small,
        }
    }

    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.done.len + self.small.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, f: &Frame) {
        self.small.reserve(FRAME_HEADER_LEN);
        self.small.put_u8(f.kind as u8);
        self.small.put_u8(f.flags);
        self.small.put_u32(f.session);
        self.small.put_u32(f.payload.len() as u32);
        if f.payload.len() < GATHER_FROM {
            self.small.extend_from_slice(&f.payload);
        } else {
            self.close_small();
            self.done.len += f.payload.len();
            self.done.parts.push(f.payload.clone());
        }
    }

    fn close_small(&mut self) {
        if !self.small.is_empty() {
            let part = self.small.split().freeze();
            self.done.len += part.len();
            self.done.parts.push(part);
        }
    }

    pub fn finish(mut self) -> Batch {
        self.close_small();
        self.done
    }
}

/// Why bytes from the peer were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("batch has protocol version {0}, this build speaks version {VERSION}; upgrade the older of agent and relay")]
    Version(u8),
    #[error("unknown frame kind {0}; the peer speaks a newer protocol or the stream is corrupt")]
    UnknownKind(u8),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD} bytes")]
    TooLarge(u32),
    #[error("batch ended in the middle of a frame or header ({0} stray bytes)")]
    Truncated(usize),
    #[error("malformed frame payload: {0}")]
    BadPayload(&'static str),
    #[error("batch starting at sequence {0} runs past the largest sequence number")]
    SequenceOverflow(u64),
}

/// Incremental batch decoder: feed it body chunks as they arrive, take frames as soon as they are
/// whole. Holds at most one partial frame, so its memory is bounded by [`MAX_FRAME_PAYLOAD`] plus
/// the size of the chunks fed to it. A batch that arrives whole (a stream message) is decoded in
/// place with [`BatchReader::from_message`]: its frames' payloads are slices of it, not copies.
#[derive(Debug, Default)]
pub struct BatchReader {
    buf: BytesMut,
    /// The whole batch, when it came as one message.
    msg: Option<Bytes>,
    header: Option<BatchHeader>,
    frames: u64,
}

/// Takes a batch header off the front of `buf`, once it is all there.
fn take_header<B: Buf>(buf: &mut B) -> Result<Option<BatchHeader>, WireError> {
    if buf.remaining() < BATCH_HEADER_LEN {
        return Ok(None);
    }
    let version = buf.chunk()[0];
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    buf.advance(1);
    let ack = buf.get_u64();
    let first_seq = buf.get_u64();
    Ok(Some(BatchHeader { ack, first_seq }))
}

/// Takes one frame off the front of `buf`, once it is all there; the payload is not copied.
fn take_frame<B: Buf>(buf: &mut B) -> Result<Option<(Kind, u8, u32, Bytes)>, WireError> {
    let c = buf.chunk();
    if c.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = Kind::from_u8(c[0]).ok_or(WireError::UnknownKind(c[0]))?;
    let len = u32::from_be_bytes([c[6], c[7], c[8], c[9]]);
    if len as usize > MAX_FRAME_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    if buf.remaining() < FRAME_HEADER_LEN + len as usize {
        return Ok(None);
    }
    let flags = c[1];
    let session = u32::from_be_bytes([c[2], c[3], c[4], c[5]]);
    buf.advance(FRAME_HEADER_LEN);
    Ok(Some((
        kind,
        flags,
        session,
        buf.copy_to_bytes(len as usize),
    )))
}

impl BatchReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader over one whole batch.
    pub fn from_message(msg: Bytes) -> Self {
        Self {
            msg: Some(msg),
            ..Self::default()
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Whether the batch header has been decoded.
    pub fn has_header(&self) -> bool {
        self.header.is_some()
    }

    fn pending(&self) -> usize {
        self.msg.as_ref().map_or(self.buf.len(), Bytes::len)
    }

    /// The batch header, once its bytes have arrived.
    pub fn header(&mut self) -> Result<Option<BatchHeader>, WireError> {
        if self.header.is_none() {
            self.header = match &mut self.msg {
                Some(m) => take_header(m)?,
                None => take_header(&mut self.buf)?,
            };
        }
        Ok(self.header)
    }

    /// The next whole frame with its sequence number, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<(u64, Frame)>, WireError> {
        let Some(header) = self.header()? else {
            return Ok(None);
        };
        let taken = match &mut self.msg {
            Some(m) => take_frame(m)?,
            None => take_frame(&mut self.buf)?,
        };
        let Some((kind, flags, session, payload)) = taken else {
            return Ok(None);
        };
        // The peer chose first_seq: near u64::MAX the sum would wrap onto old sequence numbers.
        let seq = header
            .first_seq
            .checked_add(self.frames)
            .ok_or(WireError::SequenceOverflow(header.first_seq))?;
        self.frames += 1;
        Ok(Some((seq, Frame::new(kind, flags, session, payload))))
    }

    /// Call at the end of the body: an error if it stopped inside the header or a frame.
    pub fn finish(&mut self) -> Result<BatchHeader, WireError> {
        match self.header()? {
            Some(h) if self.pending() == 0 => Ok(h),
            _ => Err(WireError::Truncated(self.pending())),
        }
    }
}

/// Decodes a whole batch held in memory.
pub fn decode_batch(body: &[u8]) -> Result<(BatchHeader, Vec<(u64, Frame)>), WireError> {
    let mut r = BatchReader::new();
    r.push(body);
    let mut frames = Vec::new();
    while let Some(f) = r.next_frame()? {
        frames.push(f);
    }
    let header = r.finish()?;
    Ok((header, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::new(Kind::Open, 0, 7, Bytes::from_static(b"{\"path\":\"/\"}")),
            Frame::data(7, false, true, Bytes::from_static(b"hello")),
            Frame::data(7, true, false, Bytes::from_static("h\u{e9}".as_bytes())),
            Frame::new(Kind::Ping, 0, 7, Bytes::from_static(b"p")),
            Frame::window(7, 65536),
            Frame::close(7, 1000, "bye"),
            Frame::data(9, false, true, Bytes::new()),
        ]
    }

    fn encode(header: BatchHeader, frames: &[Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        header.encode(&mut buf);
        for f in frames {
            f.encode(&mut buf);
        }
        buf
    }

    #[test]
    fn gathered_batches_are_the_contiguous_bytes_and_share_large_payloads() {
        let big = Bytes::from(vec![0xAB; GATHER_FROM]);
        let mut frames = sample();
        frames.insert(2, Frame::data(7, false, false, big.clone()));
        frames.push(Frame::data(9, false, true, big.clone()));
        let header = BatchHeader {
            ack: 5,
            first_seq: 1,
        };
        let mut enc = BatchEncoder::new(header);
        for f in &frames {
            enc.push(f);
        }
        let want = encode(header, &frames);
        assert_eq!(enc.len(), want.len());
        let batch = enc.finish();
        assert_eq!(batch.len(), want.len());
        // small | big | small | big: the large payloads are parts of their own, not copies.
        assert_eq!(batch.parts().len(), 4);
        assert_eq!(batch.parts()[1].as_ptr(), big.as_ptr());
        assert_eq!(batch.parts()[3].as_ptr(), big.as_ptr());
        assert_eq!(&batch.clone().into_bytes()[..], &want[..]);

        let lone = BatchEncoder::new(header).finish();
        assert_eq!(lone.parts().len(), 1, "a batch of no frames is its header");
        assert_eq!(&lone.into_bytes()[..], &encode(header, &[])[..]);
    }

    #[test]
    fn whole_messages_decode_like_streamed_bodies() {
        let mut out = BytesMut::new();
        BatchHeader {
            ack: 3,
            first_seq: 10,
        }
        .encode(&mut out);
        Frame::data(7, false, true, Bytes::from_static(b"hello")).encode(&mut out);
        Frame::close(7, 1000, "bye").encode(&mut out);
        let whole = out.freeze();
        let streamed = decode_batch(&whole).unwrap();
        let mut r = BatchReader::from_message(whole.clone());
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            frames.push(f);
        }
        assert_eq!(r.finish().unwrap(), streamed.0);
        assert_eq!(frames, streamed.1);
        let mut cut = BatchReader::from_message(whole.slice(..whole.len() - 2));
        while cut.next_frame().unwrap().is_some() {}
        assert!(matches!(cut.finish(), Err(WireError::Truncated(_))));
    }

    #[test]
    fn exact_bytes_of_a_small_batch() {
        let buf = encode(
            BatchHeader {
                ack: 2,
                first_seq: 5,
            },
            &[Frame::data(1, false, true, Bytes::from_static(b"hi"))],
        );
        assert_eq!(
            &buf[..],
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5, // header
                3, FLAG_FIN, 0, 0, 0, 1, 0, 0, 0, 2, b'h', b'i'
            ][..]
        );
    }

    #[test]
    fn round_trip_whole_and_split_at_every_byte() {
        let header = BatchHeader {
            ack: 42,
            first_seq: 1000,
        };
        let frames = sample();
        let buf = encode(header, &frames);
        let (h, got) = decode_batch(&buf).unwrap();
        assert_eq!(h, header);
        let want: Vec<(u64, Frame)> = frames
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, f)| (1000 + i as u64, f))
            .collect();
        assert_eq!(got, want);

        for split in 0..buf.len() {
            let mut r = BatchReader::new();
            let mut got = Vec::new();
            r.push(&buf[..split]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            r.push(&buf[split..]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(r.finish().unwrap(), header);
            assert_eq!(got, want, "split at {split}");
        }
    }

    #[test]
    fn refuses_bad_input_without_panicking() {
        assert_eq!(decode_batch(&[2; 17]).unwrap_err(), WireError::Version(2));
        let mut buf = encode(
            BatchHeader {
                ack: 0,
                first_seq: 0,
            },
            &[],
        );
        buf.extend_from_slice(&[99, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(decode_batch(&buf).unwrap_err(), WireError::UnknownKind(99));
        let mut buf = encode(
            BatchHeader {
                ack: 0,
                first_seq: 0,
            },
            &[],
        );
        buf.extend_from_slice(&[3, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decode_batch(&buf).unwrap_err(),
            WireError::TooLarge(u32::MAX)
        );
        let buf = encode(
            BatchHeader {
                ack: 0,
                first_seq: 0,
            },
            &[Frame::data(1, false, true, Bytes::from_static(b"abc"))],
        );
        assert_eq!(
            decode_batch(&buf[..buf.len() - 1]).unwrap_err(),
            WireError::Truncated(FRAME_HEADER_LEN + 2)
        );
        assert!(decode_batch(&[1, 0, 0]).is_err());
        assert!(Frame::new(Kind::Window, 0, 1, Bytes::from_static(b"abc"))
            .window_credit()
            .is_err());
        assert!(Frame::new(Kind::Close, 0, 1, Bytes::from_static(b"a"))
            .close_parts()
            .is_err());
    }

    #[test]
    fn sequence_numbers_past_u64_max_are_refused() {
        // Found by fuzz/fuzz_targets/batch_reader.rs: this overflowed (a panic with overflow
        // checks, a wrap to sequence 0 without).
        let mut buf = encode(
            BatchHeader {
                ack: 0,
                first_seq: u64::MAX,
            },
            &[],
        );
        let last = buf.clone();
        buf.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decode_batch(&buf).unwrap_err(),
            WireError::SequenceOverflow(u64::MAX)
        );
        // Frame u64::MAX itself is fine.
        let mut one = last;
        one.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_batch(&one).unwrap().1[0].0, u64::MAX);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of mutated valid batches.
        let base = encode(
            BatchHeader {
                ack: 1,
                first_seq: 1,
            },
            &sample(),
        );
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..2000 {
            let mut buf = base.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state as usize) % buf.len();
                buf[i] = (state >> 32) as u8;
            }
            let _ = decode_batch(&buf);
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let long = "\u{e9}".repeat(100); // 200 bytes
        let f = Frame::close(1, 1011, &long);
        let (code, reason) = f.close_parts().unwrap().unwrap();
        assert_eq!(code, 1011);
        assert_eq!(reason.len(), 122);
        assert!(Frame::abort(1, "x").is_abort());
    }
}
