//! The agent link's batch decoder, which reads every poll, push and stream body from the peer.
//!
//! Input: `k | sizes[k] | body`: the body is pushed in chunks of these sizes (0 counts as 1),
//! cycled; with no sizes, in one go.
//!
//! Invariants checked:
//! - no panic;
//! - the body pushed whole, pushed in chunks, and read in place as one message
//!   (`BatchReader::from_message`) yields the same frames, sequence numbers and verdict
//!   (including `decode_batch`'s);
//! - sequence numbers are consecutive from the header's `first_seq`;
//! - round trip: a batch that decodes re-encodes (header, then frames) to the very same bytes,
//!   and those decode to the same header and frames.
#![no_main]

use backhaul_common::wire::{decode_batch, BatchHeader, BatchReader, Frame, WireError};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<(u64, Frame)>,
    /// `finish()`'s verdict, or the first error met on the way.
    end: Result<BatchHeader, WireError>,
}

/// Takes every whole frame the reader holds; `Err` on the first error.
fn drain(r: &mut BatchReader, frames: &mut Vec<(u64, Frame)>) -> Result<(), WireError> {
    while let Some(f) = r.next_frame()? {
        frames.push(f);
    }
    Ok(())
}

fn chunked(sizes: &[u8], body: &[u8]) -> Outcome {
    let mut r = BatchReader::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut chunks = sizes.iter().cycle();
    while fed < body.len() {
        let n = chunks
            .next()
            .map_or(body.len(), |&s| usize::from(s).max(1))
            .min(body.len() - fed);
        r.push(&body[fed..fed + n]);
        fed += n;
        // header() alone first, as the relay's push handler does.
        if let Err(e) = r.header().and_then(|_| drain(&mut r, &mut frames)) {
            return Outcome {
                frames,
                end: Err(e),
            };
        }
    }
    let end = drain(&mut r, &mut frames).and_then(|()| r.finish());
    Outcome { frames, end }
}

fn in_place(body: &[u8]) -> Outcome {
    let mut r = BatchReader::from_message(Bytes::copy_from_slice(body));
    let mut frames = Vec::new();
    let end = drain(&mut r, &mut frames).and_then(|()| r.finish());
    Outcome { frames, end }
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 16).min(rest.len());
    let (sizes, body) = rest.split_at(k);

    let whole = chunked(&[], body);
    assert_eq!(
        chunked(sizes, body),
        whole,
        "a chunked body decoded differently"
    );
    assert_eq!(in_place(body), whole, "a whole message decoded differently");
    match decode_batch(body) {
        Ok((h, frames)) => {
            assert_eq!(whole.end, Ok(h));
            assert_eq!(whole.frames, frames);
        }
        Err(e) => assert_eq!(whole.end, Err(e)),
    }

    if !whole.frames.is_empty() {
        // A frame came out, so the header was whole: version, ack, first_seq.
        let first = u64::from_be_bytes(body[9..17].try_into().unwrap());
        for (i, (seq, _)) in whole.frames.iter().enumerate() {
            assert_eq!(Some(*seq), first.checked_add(i as u64), "frame {i}'s seq");
        }
    }

    if let Ok(header) = whole.end {
        let mut out = BytesMut::new();
        header.encode(&mut out);
        for (_, f) in &whole.frames {
            f.encode(&mut out);
        }
        assert_eq!(&out[..], body, "re-encoding changed the bytes");
        let (h, frames) = decode_batch(&out).expect("a re-encoded batch is refused");
        assert_eq!(h, header);
        assert_eq!(frames, whole.frames);
    }
});
