//! The WebSocket frame decoder that every session socket reads its peer through.
//!
//! Input: `cfg | max_lo | max_hi | piece | k | sizes[k] | stream`.
//! - `cfg` bit 0: our role (0 server: the peer must mask; 1 client: it must not); bit 1: no
//!   message limit (u64::MAX); otherwise the limit is `max_lo | max_hi << 8` bytes.
//! - `piece`: the largest data piece asked of the decoder (0 means 1, as the decoder treats it).
//! - `sizes`: the stream is fed in chunks of these sizes (0 counts as 1), cycled (none: in one
//!   go).
//!
//! Invariants checked:
//! - no panic;
//! - the payload bytes handed out never exceed the bytes consumed, nor those fed;
//! - data pieces are at most `piece` bytes, control payloads at most 125;
//! - a data message never exceeds the limit, and a piece's text flag is its message's;
//! - once refused, the decoder stays refused (asked again, with or without more bytes);
//! - the bytes `frame_bytes` says a whole frame needs never exceed the limit plus a header;
//! - the events, with each message's pieces joined, and the final verdict do not depend on how
//!   the stream was split nor on the piece size.
#![no_main]

use backhaul_common::ws::{Decoder, Event, Role, MAX_CONTROL_PAYLOAD};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// An event with the pieces of a data message joined.
#[derive(Debug, PartialEq, Eq)]
enum Joined {
    Data {
        text: bool,
        fin: bool,
        payload: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Joined>,
    /// The error's text, or `None` when the stream ended waiting for more bytes.
    refused: Option<String>,
}

fn push(events: &mut Vec<Joined>, ev: Event) {
    match ev {
        Event::Data { text, fin, payload } => {
            if let Some(Joined::Data {
                text: t,
                fin: false,
                payload: p,
            }) = events.last_mut()
            {
                assert_eq!(*t, text, "a piece changed its message's text flag");
                p.extend_from_slice(&payload);
                if fin {
                    *events.last_mut().unwrap() = Joined::Data {
                        text,
                        fin,
                        payload: std::mem::take(p),
                    };
                }
            } else {
                events.push(Joined::Data {
                    text,
                    fin,
                    payload: payload.to_vec(),
                });
            }
        }
        Event::Ping(p) => events.push(Joined::Ping(p.to_vec())),
        Event::Pong(p) => events.push(Joined::Pong(p.to_vec())),
        Event::Close(c) => events.push(Joined::Close(c)),
    }
}

fn run(role: Role, max_message: u64, piece: usize, sizes: &[u8], stream: &[u8]) -> Outcome {
    let mut d = Decoder::new(role, max_message);
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut handed_out = 0usize;
    let mut message: Option<(bool, u64)> = None;
    let mut events = Vec::new();
    let mut chunks = sizes.iter().cycle();
    loop {
        // Feed the next chunk (all that is left when no sizes were given); a size of 0 feeds
        // one byte, so the loop always ends.
        let n = match chunks.next() {
            Some(&s) => usize::from(s).max(1).min(stream.len() - fed),
            None => stream.len() - fed,
        };
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            // What a whole-frame reader (the agent link's) reserves is bounded by the message
            // limit, plus a header: a peer's length field alone never sizes a buffer.
            if let Ok(Some(n)) = d.frame_bytes(&buf) {
                assert!(
                    n as u64 <= max_message.saturating_add(14),
                    "frame_bytes {n} over the limit {max_message}"
                );
            }
            let before = buf.len();
            match d.decode(&mut buf, piece) {
                Ok(None) => break,
                Ok(Some(ev)) => {
                    let consumed = before - buf.len();
                    let len = match &ev {
                        Event::Data { text, fin, payload } => {
                            assert!(payload.len() <= piece.max(1), "piece over max_piece");
                            let so_far = match message {
                                Some((t, n)) => {
                                    assert_eq!(t, *text, "text flag changed within a message");
                                    n
                                }
                                None => 0,
                            };
                            let total = so_far + payload.len() as u64;
                            assert!(total <= max_message, "message of {total} > {max_message}");
                            message = (!fin).then_some((*text, total));
                            payload.len()
                        }
                        Event::Ping(p) | Event::Pong(p) => {
                            assert!(p.len() <= MAX_CONTROL_PAYLOAD);
                            p.len()
                        }
                        Event::Close(c) => {
                            if let Some((_, reason)) = c {
                                assert!(reason.len() <= MAX_CONTROL_PAYLOAD - 2);
                            }
                            0
                        }
                    };
                    assert!(
                        len <= consumed,
                        "handed out {len} bytes for {consumed} consumed"
                    );
                    handed_out += len;
                    assert!(handed_out <= fed, "handed out {handed_out} of {fed} fed");
                    push(&mut events, ev);
                }
                Err(e) => {
                    let refused = e.to_string();
                    // Refused stays refused: asked again as is, and with more bytes.
                    let again = d.decode(&mut buf, piece);
                    assert!(
                        again.is_err(),
                        "refused ({refused}), then accepted: {again:?}"
                    );
                    buf.extend_from_slice(&stream[fed..]);
                    buf.extend_from_slice(&[0x82, 0x00, 0x81, 0x80, 0, 0, 0, 0]);
                    let again = d.decode(&mut buf, piece);
                    assert!(
                        again.is_err(),
                        "refused ({refused}), then accepted after more bytes: {again:?}"
                    );
                    return Outcome {
                        events,
                        refused: Some(refused),
                    };
                }
            }
        }
        if fed == stream.len() {
            return Outcome {
                events,
                refused: None,
            };
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (cfg, rest) = data.split_at(5);
    let role = if cfg[0] & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let max_message = if cfg[0] & 2 != 0 {
        u64::MAX
    } else {
        u64::from(u16::from_le_bytes([cfg[1], cfg[2]]))
    };
    let piece = usize::from(cfg[3]);
    let k = usize::from(cfg[4] % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);

    let split = run(role, max_message, piece, sizes, stream);
    let whole = run(role, max_message, usize::MAX, &[], stream);
    assert_eq!(split, whole, "the split stream decoded differently");
});
