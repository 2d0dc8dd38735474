//! The reliability bookkeeping of the agent link, driven by sequences of operations with the
//! sequence numbers and acks a peer could send (any u64).
//!
//! Input: a list of operations, each an opcode byte and its arguments (u64s big-endian, cut
//! short at the end of the input as zeros).
//!
//! Invariants checked, against a simple model:
//! - no panic and no arithmetic overflow, whatever the u64s;
//! - `RecvState::arrive` delivers exactly the next sequence number, drops older ones as
//!   duplicates and refuses gaps, and its ack moves only by delivery;
//! - `SendBuffer::push` numbers frames consecutively; `ack` refuses acks beyond what was sent,
//!   ignores stale ones and frees exactly the acknowledged frames (`len`, `bytes`, `base`);
//! - `encode_batch` writes a batch that decodes to the buffered frames from `from` on, with at
//!   least one frame when there is one, and within the byte budget after the first frame;
//! - an exchange of batches, cut anywhere and retransmitted from any point the sender accepts,
//!   delivers every pushed frame to the receiver exactly once and in order;
//! - `StreamCursor` sends each frame once per cursor, in order, and its limit stays within
//!   the maximum;
//! - `take_resent` counts exactly the frames that were in an earlier batch.
#![no_main]

use backhaul_common::reliable::{
    AckBeyondSent, Arrival, RecvState, SendBuffer, SequenceGap, StreamCursor, StreamNext,
};
use backhaul_common::wire::{decode_batch, Frame, BATCH_HEADER_LEN};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeSet, VecDeque};

/// After a batch of `n` frames from `start`: the ones in `batched` (every sequence number ever
/// batched) were sent before.
fn resent_check(sender: &mut SendBuffer, batched: &mut BTreeSet<u64>, start: u64, n: usize) {
    let again = (start..start + n as u64)
        .filter(|seq| !batched.insert(*seq))
        .count() as u64;
    assert_eq!(sender.take_resent(), again, "retransmissions miscounted");
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u64(&mut self) -> u64 {
        let n = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_be_bytes(b)
    }
}

/// The frame the model pushes as number `i`: its payload says which it is.
fn frame(i: u64, len: u8) -> Frame {
    let mut p = i.to_be_bytes().to_vec();
    p.resize(8 + usize::from(len), 0xAB);
    Frame::data((i % 3) as u32, i.is_multiple_of(2), true, Bytes::from(p))
}

fn number(f: &Frame) -> u64 {
    u64::from_be_bytes(f.payload[..8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);

    // A lone receiver fed any sequence numbers, and its model.
    let mut lone = RecvState::new();
    let mut lone_next = 0u64;

    // A sender and a receiver joined by a lossy exchange, and the model of the sender: what it
    // holds (numbers of the frames pushed and not acknowledged) and from where.
    let mut sender = SendBuffer::new();
    let mut held: VecDeque<Frame> = VecDeque::new();
    let mut base = 0u64;
    let mut receiver = RecvState::new();
    let mut delivered = 0u64;
    // Every sequence number batched so far.
    let mut batched = BTreeSet::new();
    let mut cursor: Option<(StreamCursor, u64, usize)> = None;

    while let Some(op) = input.u8() {
        match op % 8 {
            // A lone receiver: any sequence number.
            0 => {
                let seq = input.u64();
                let got = lone.arrive(seq);
                let want = if seq < lone_next {
                    Ok(Arrival::Duplicate)
                } else if seq == lone_next {
                    lone_next += 1;
                    Ok(Arrival::Deliver)
                } else {
                    Err(SequenceGap {
                        expected: lone_next,
                        got: seq,
                    })
                };
                assert_eq!(got, want);
                assert_eq!(lone.ack(), lone_next);
            }
            // Push a frame.
            1 => {
                let len = input.u8().unwrap_or(0);
                let next = base + held.len() as u64;
                let f = frame(next, len);
                assert_eq!(sender.push(f.clone()), next);
                held.push_back(f);
            }
            // An ack from the peer: any u64.
            2 => {
                let ack = input.u64();
                let next = base + held.len() as u64;
                let got = sender.ack(ack);
                if ack > next {
                    assert_eq!(got, Err(AckBeyondSent { ack, next }));
                } else {
                    assert_eq!(got, Ok(()));
                    while base < ack {
                        held.pop_front();
                        base += 1;
                    }
                }
            }
            // has_from at any u64.
            3 => {
                let from = input.u64();
                let next = base + held.len() as u64;
                assert_eq!(sender.has_from(from), from.max(base) < next);
            }
            // A batch from any point, with any ack and byte budget; checked, then delivered up
            // to a cut. Only starts the receiver accepts without a gap are delivered.
            4 => {
                let from = input.u64();
                let peer_ack = input.u64();
                let max_bytes = input.u64() as usize;
                let cut = input.u8().unwrap_or(255);
                let (batch, n) = sender.encode_batch(from, peer_ack, max_bytes);
                let out = batch.into_bytes();
                let (h, frames) = decode_batch(&out).expect("encode_batch wrote a bad batch");
                let start = from.max(base);
                assert_eq!((h.ack, h.first_seq), (peer_ack, start));
                assert_eq!(frames.len(), n);
                resent_check(&mut sender, &mut batched, start, n);
                let avail = (base + held.len() as u64).saturating_sub(start);
                assert!(n as u64 <= avail);
                assert_eq!(n == 0, avail == 0, "no frame sent while {avail} were due");
                let size: usize = frames.iter().map(|(_, f)| f.encoded_len()).sum();
                assert_eq!(out.len(), BATCH_HEADER_LEN + size);
                if n > 1 {
                    assert!(size <= max_bytes, "batch of {size} bytes over {max_bytes}");
                }
                for (i, (seq, f)) in frames.iter().enumerate() {
                    assert_eq!(*seq, start + i as u64);
                    assert_eq!(*f, held[(seq - base) as usize]);
                }
                if start <= receiver.ack() {
                    for (seq, f) in frames.into_iter().take(usize::from(cut)) {
                        match receiver.arrive(seq) {
                            Ok(Arrival::Deliver) => {
                                assert_eq!(number(&f), delivered, "out of order");
                                delivered += 1;
                            }
                            Ok(Arrival::Duplicate) => assert!(number(&f) < delivered),
                            Err(e) => panic!("a batch from an acked point left a gap: {e}"),
                        }
                    }
                }
            }
            // The receiver's ack reaches the sender.
            5 => {
                sender
                    .ack(receiver.ack())
                    .expect("the receiver acked unsent frames");
                while base < receiver.ack() {
                    held.pop_front();
                    base += 1;
                }
            }
            // A new stream cursor from the receiver's ack, with any batch limit.
            6 => {
                let limit = input.u64() as usize;
                // The maximum is the relay's configuration (KiB as u32), not the peer's.
                let max = (input.u64() as u32 as usize).max(1);
                let from = receiver.ack();
                cursor = Some((StreamCursor::new(from, limit, max), from, max));
            }
            // The cursor's next batch.
            _ => {
                let force = input.u8().unwrap_or(0) & 1 == 1;
                let Some((c, next, max)) = cursor.as_mut() else {
                    continue;
                };
                match c.next_batch(&mut sender, receiver.ack(), force) {
                    StreamNext::Batch(b) => {
                        let (h, frames) =
                            decode_batch(&b.into_bytes()).expect("cursor wrote a bad batch");
                        assert_eq!(h.ack, receiver.ack());
                        assert_eq!(h.first_seq, (*next).max(base));
                        resent_check(&mut sender, &mut batched, h.first_seq, frames.len());
                        *next = h.first_seq + frames.len() as u64;
                        for (seq, f) in frames {
                            if receiver.arrive(seq) == Ok(Arrival::Deliver) {
                                assert_eq!(number(&f), delivered, "out of order");
                                delivered += 1;
                            }
                        }
                    }
                    StreamNext::AckDue | StreamNext::Idle => {
                        assert!(!force);
                        assert!(!sender.has_from(*next));
                    }
                }
                assert!(c.limit() <= *max, "limit {} over {max}", c.limit());
            }
        }
        assert_eq!(sender.base(), base);
        assert_eq!(sender.len(), held.len());
        assert_eq!(sender.next_seq(), base + held.len() as u64);
        assert_eq!(sender.is_empty(), held.is_empty());
        let bytes: usize = held.iter().map(Frame::encoded_len).sum();
        assert_eq!(sender.bytes(), bytes);
        assert!(receiver.ack() <= sender.next_seq());
        assert_eq!(receiver.ack(), delivered);
    }
});
