//! Sequence numbers, acknowledgements and retransmission for one direction of the agent link.
//! No IO here: the relay and the agent drive these from their HTTP handlers.
//!
//! Each direction numbers its frames 0, 1, 2, ... The sender keeps every frame until the receiver
//! acknowledges it (`ack` = the receiver's next expected sequence number), and every batch it
//! sends starts from a sequence number the receiver asked for or already acknowledged. So an HTTP
//! exchange cut half-way costs a retransmission, never a loss; the receiver drops the
//! duplicates, so nothing is delivered twice.

use crate::wire::{Batch, BatchEncoder, BatchHeader, Frame};
use std::collections::{BTreeMap, VecDeque};

/// The sending half: frames not yet acknowledged, oldest first.
#[derive(Debug, Default)]
pub struct SendBuffer {
    /// Sequence number of `frames[0]`.
    base: u64,
    /// Each frame, and whether it has been put in a batch before.
    frames: VecDeque<(Frame, bool)>,
    bytes: usize,
    /// Frames put in a batch again since [`SendBuffer::take_resent`] last asked.
    resent: u64,
}

/// The peer acknowledged frames that were never sent: it is confused or malicious.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("peer acknowledged up to sequence {ack} but only {next} frames were ever sent")]
pub struct AckBeyondSent {
    pub ack: u64,
    pub next: u64,
}

impl SendBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a frame and returns its sequence number.
    pub fn push(&mut self, frame: Frame) -> u64 {
        self.bytes += frame.encoded_len();
        self.frames.push_back((frame, false));
        self.next_seq() - 1
    }

    /// The sequence number the next pushed frame will get.
    pub fn next_seq(&self) -> u64 {
        self.base + self.frames.len() as u64
    }

    /// The oldest unacknowledged sequence number.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Frames waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Encoded bytes of the frames waiting for acknowledgement.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets every frame below `ack`. A stale (smaller) ack is harmless and ignored.
    pub fn ack(&mut self, ack: u64) -> Result<(), AckBeyondSent> {
        if ack > self.next_seq() {
            return Err(AckBeyondSent {
                ack,
                next: self.next_seq(),
            });
        }
        while self.base < ack {
            if let Some((f, _)) = self.frames.pop_front() {
                self.bytes -= f.encoded_len();
            }
            self.base += 1;
        }
        Ok(())
    }

    /// Whether there is anything at or after `from` to send.
    pub fn has_from(&self, from: u64) -> bool {
        from.max(self.base) < self.next_seq()
    }

    /// Encodes a batch: the header (carrying `peer_ack` for the other direction) and the frames
    /// from `from` on, up to about `max_bytes` (at least one frame when there is one). Returns it
    /// with the number of frames in it. `from` below the buffer's base starts at the base. Only
    /// headers and small payloads are copied (see [`Batch`]). Frames that were in an earlier
    /// batch count as retransmitted (see [`SendBuffer::take_resent`]).
    pub fn encode_batch(&mut self, from: u64, peer_ack: u64, max_bytes: usize) -> (Batch, usize) {
        let from = from.max(self.base);
        let mut out = BatchEncoder::new(BatchHeader {
            ack: peer_ack,
            first_seq: from,
        });
        let skip = (from - self.base) as usize;
        let mut written = 0;
        let mut size = 0;
        for (f, batched) in self.frames.iter_mut().skip(skip) {
            if written > 0 && size + f.encoded_len() > max_bytes {
                break;
            }
            size += f.encoded_len();
            out.push(f);
            written += 1;
            self.resent += u64::from(std::mem::replace(batched, true));
        }
        (out.finish(), written)
    }

    /// How many frames went out again (after a lost exchange or a broken stream) since the
    /// last call: what the metrics call retransmissions.
    pub fn take_resent(&mut self) -> u64 {
        std::mem::take(&mut self.resent)
    }
}

/// The sending position of one streaming connection (WebSocket or HTTP/2): unlike a long-poll,
/// a stream sends each frame once and moves on without waiting for the ack. A new connection
/// starts a new cursor at the peer's ack, so what was in flight on a broken one is sent again.
///
/// A batch is only of use to the receiver when whole, so on a path that cuts connections after
/// some bytes, batches must stay under that. The cursor's batch limit starts where the caller
/// says (smaller after breaks) and doubles each time the peer acknowledges more of what was
/// sent, up to the maximum.
#[derive(Debug, Clone, Copy)]
pub struct StreamCursor {
    next: u64,
    acked: Option<u64>,
    limit: usize,
    max: usize,
    seen_base: u64,
}

/// What a stream writer should do now.
#[derive(Debug)]
pub enum StreamNext {
    /// Send this batch.
    Batch(Batch),
    /// Nothing new to send, but the peer has not heard our latest ack; send it soon.
    AckDue,
    /// Nothing to send.
    Idle,
}

impl StreamCursor {
    /// A cursor that sends from `from` (the peer's ack) on, in batches of about `limit` bytes,
    /// growing to `max`.
    pub fn new(from: u64, limit: usize, max: usize) -> Self {
        Self {
            next: from,
            acked: None,
            limit: limit.min(max),
            max,
            seen_base: from,
        }
    }

    /// The current batch limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The next batch from `buf`, carrying `ack`. With `force`, a batch goes even when it
    /// carries nothing new (a heartbeat, or an ack that waited long enough).
    pub fn next_batch(&mut self, buf: &mut SendBuffer, ack: u64, force: bool) -> StreamNext {
        if buf.base() > self.seen_base {
            self.seen_base = buf.base();
            self.limit = (self.limit * 2).min(self.max);
        }
        let fresh = buf.has_from(self.next);
        if !fresh && !force {
            return if self.acked == Some(ack) {
                StreamNext::Idle
            } else {
                StreamNext::AckDue
            };
        }
        let from = self.next.max(buf.base());
        let (batch, n) = buf.encode_batch(from, ack, self.limit);
        self.next = from + n as u64;
        self.acked = Some(ack);
        StreamNext::Batch(batch)
    }
}

/// The receiving half: the next sequence number expected.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecvState {
    next: u64,
}

/// What to do with an arriving frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// New: deliver it.
    Deliver,
    /// Already delivered (a retransmission): drop it.
    Duplicate,
}

/// A frame arrived past a hole in the sequence: the sender broke the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("frame with sequence {got} arrived while {expected} was expected; frames were skipped")]
pub struct SequenceGap {
    pub expected: u64,
    pub got: u64,
}

impl RecvState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The acknowledgement to send: every frame below this has been delivered.
    pub fn ack(&self) -> u64 {
        self.next
    }

    pub fn arrive(&mut self, seq: u64) -> Result<Arrival, SequenceGap> {
        if seq < self.next {
            Ok(Arrival::Duplicate)
        } else if seq == self.next {
            self.next += 1;
            Ok(Arrival::Deliver)
        } else {
            Err(SequenceGap {
                expected: self.next,
                got: seq,
            })
        }
    }
}

/// The receiving half for a transport whose batches may arrive out of order: long-poll with
/// several polls in flight, each answered by its own HTTP exchange. Frames past a hole wait here
/// (up to `max_held` encoded bytes) until the hole is filled; each frame is delivered once, in
/// sequence order.
///
/// When a frame does not fit, it is dropped and [`Reorder::take_resend`] says so: the receiver
/// then asks the sender to send again from its ack. Dropping is always safe, since the sender
/// keeps every frame until it is acknowledged.
#[derive(Debug)]
pub struct Reorder {
    recv: RecvState,
    held: BTreeMap<u64, Frame>,
    held_bytes: usize,
    max_held: usize,
    resend: bool,
}

impl Reorder {
    /// Carries on from `recv` (the receive state another transport left).
    pub fn new(recv: RecvState, max_held: usize) -> Self {
        Self {
            recv,
            held: BTreeMap::new(),
            held_bytes: 0,
            max_held,
            resend: false,
        }
    }

    /// The acknowledgement to send: every frame below this has been delivered.
    pub fn ack(&self) -> u64 {
        self.recv.ack()
    }

    /// Whether frames past a hole are waiting.
    pub fn has_hole(&self) -> bool {
        !self.held.is_empty()
    }

    /// Encoded bytes of the frames waiting past a hole.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The receive state for an in-order transport. Frames held past a hole are forgotten: the
    /// sender still has them and sends them again from the ack.
    pub fn into_recv(self) -> RecvState {
        self.recv
    }

    /// Takes one arriving frame and hands `deliver` every frame that is now in order: none, this
    /// one, or this one and the held frames it unblocks.
    pub fn arrive(&mut self, seq: u64, frame: Frame, mut deliver: impl FnMut(Frame)) {
        let next = self.recv.next;
        if seq < next || self.held.contains_key(&seq) {
            return;
        }
        if seq > next {
            let len = frame.encoded_len();
            if self.held_bytes + len > self.max_held {
                self.resend = true;
                return;
            }
            self.held_bytes += len;
            self.held.insert(seq, frame);
            return;
        }
        deliver(frame);
        self.recv.next += 1;
        while let Some(f) = self.held.remove(&self.recv.next) {
            self.held_bytes -= f.encoded_len();
            deliver(f);
            self.recv.next += 1;
        }
    }

    /// Whether a frame was dropped for lack of room since the last call: ask the sender to send
    /// again from [`Reorder::ack`].
    pub fn take_resend(&mut self) -> bool {
        std::mem::take(&mut self.resend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_batch;
    use bytes::Bytes;

    fn data(i: u8) -> Frame {
        Frame::data(1, false, true, Bytes::from(vec![i; 10]))
    }

    #[test]
    fn ack_frees_and_rejects_the_impossible() {
        let mut s = SendBuffer::new();
        for i in 0..5 {
            assert_eq!(s.push(data(i)), i as u64);
        }
        assert_eq!(s.bytes(), 5 * 20);
        s.ack(2).unwrap();
        assert_eq!((s.base(), s.len(), s.bytes()), (2, 3, 60));
        s.ack(1).unwrap(); // stale: ignored
        assert_eq!(s.base(), 2);
        assert_eq!(s.ack(6), Err(AckBeyondSent { ack: 6, next: 5 }));
        s.ack(5).unwrap();
        assert!(s.is_empty());
        assert!(!s.has_from(5));
    }

    #[test]
    fn stream_cursor_sends_each_frame_once_and_restarts_from_the_ack() {
        let mut s = SendBuffer::new();
        for i in 0..4 {
            s.push(data(i));
        }
        let mut c = StreamCursor::new(0, 45, 1000);
        let StreamNext::Batch(b) = c.next_batch(&mut s, 7, false) else {
            panic!("expected a batch")
        };
        let (h, frames) = decode_batch(&b.clone().into_bytes()).unwrap();
        assert_eq!((h.ack, h.first_seq, frames.len()), (7, 0, 2));
        let StreamNext::Batch(b) = c.next_batch(&mut s, 7, false) else {
            panic!("expected a batch")
        };
        assert_eq!(decode_batch(&b.clone().into_bytes()).unwrap().1.len(), 2);
        assert!(matches!(c.next_batch(&mut s, 7, false), StreamNext::Idle));
        assert!(matches!(c.next_batch(&mut s, 8, false), StreamNext::AckDue));
        let StreamNext::Batch(b) = c.next_batch(&mut s, 8, true) else {
            panic!("expected a heartbeat")
        };
        let (h, frames) = decode_batch(&b.clone().into_bytes()).unwrap();
        assert_eq!((h.ack, h.first_seq, frames.len()), (8, 4, 0));
        // The peer's ack grows the batch limit.
        s.ack(1).unwrap();
        assert!(matches!(c.next_batch(&mut s, 8, false), StreamNext::Idle));
        assert_eq!(c.limit(), 90);
        // A new connection after the peer acknowledged 1: frames 1.. go again.
        let mut c = StreamCursor::new(1, 1000, 1000);
        let StreamNext::Batch(b) = c.next_batch(&mut s, 8, false) else {
            panic!("expected a batch")
        };
        let (h, frames) = decode_batch(&b.clone().into_bytes()).unwrap();
        assert_eq!((h.first_seq, frames.len()), (1, 3));
        // Those three went out before: they count as retransmitted, once.
        assert_eq!(s.take_resent(), 3);
        assert_eq!(s.take_resent(), 0);
        // A new frame is not a retransmission.
        s.push(data(4));
        assert!(matches!(
            c.next_batch(&mut s, 8, false),
            StreamNext::Batch(_)
        ));
        assert_eq!(s.take_resent(), 0);
    }

    #[test]
    fn batches_respect_from_and_size() {
        let mut s = SendBuffer::new();
        for i in 0..10 {
            s.push(data(i));
        }
        let (out, n) = s.encode_batch(3, 77, 45);
        let out = out.into_bytes();
        assert_eq!(n, 2);
        let (h, frames) = decode_batch(&out).unwrap();
        assert_eq!((h.ack, h.first_seq), (77, 3));
        assert_eq!(frames[0], (3, data(3)));
        assert_eq!(frames[1], (4, data(4)));

        // A frame larger than the budget still goes alone, so progress is always possible.
        assert_eq!(s.encode_batch(0, 0, 1).1, 1);
        // Nothing to send: a header-only batch that still carries the ack.
        let (out, n) = s.encode_batch(10, 5, 1000);
        let out = out.into_bytes();
        assert_eq!(n, 0);
        assert_eq!(decode_batch(&out).unwrap().0.first_seq, 10);
    }

    /// Simulates exchanges that are cut at every possible point and checks that the receiver
    /// gets every frame exactly once, in order.
    #[test]
    fn cut_exchanges_lose_and_duplicate_nothing() {
        let mut sender = SendBuffer::new();
        let mut receiver = RecvState::new();
        let mut delivered = Vec::new();
        let mut produced = 0u8;
        let mut round = 0usize;
        while delivered.len() < 200 {
            round += 1;
            // The sender produces a few frames per round.
            for _ in 0..(round % 4) {
                sender.push(data(produced));
                produced = produced.wrapping_add(1);
            }
            let (out, n) = sender.encode_batch(sender.base(), 0, 60);
            let out = out.into_bytes();
            if n == 0 {
                continue;
            }
            // The request is cut after a pseudo-random number of whole frames (maybe none).
            let (_, frames) = decode_batch(&out).unwrap();
            let keep = round * 7 % (frames.len() + 1);
            for (seq, f) in frames.into_iter().take(keep) {
                if receiver.arrive(seq).unwrap() == Arrival::Deliver {
                    delivered.push(f.payload[0]);
                }
            }
            // Half of the time the response carrying the ack is lost too.
            if round.is_multiple_of(2) {
                sender.ack(receiver.ack()).unwrap();
            }
        }
        for (i, b) in delivered.iter().enumerate() {
            assert_eq!(*b, i as u8, "frame {i} out of order or duplicated");
        }
    }

    #[test]
    fn gaps_are_protocol_errors() {
        let mut r = RecvState::new();
        assert_eq!(r.arrive(0), Ok(Arrival::Deliver));
        assert_eq!(r.arrive(0), Ok(Arrival::Duplicate));
        assert_eq!(
            r.arrive(2),
            Err(SequenceGap {
                expected: 1,
                got: 2
            })
        );
    }

    #[test]
    fn reorder_delivers_each_frame_once_in_order_whatever_the_arrival_order() {
        let mut r = Reorder::new(RecvState::new(), 1000);
        let mut got = Vec::new();
        // Batches [4,6), [0,2), [2,4) arrive in that order, with a duplicate of 5 and of 0.
        for seq in [4u64, 5, 0, 1, 5, 0, 2, 3] {
            r.arrive(seq, data(seq as u8), |f| got.push(f.payload[0]));
            if seq == 5 {
                assert!(r.has_hole());
                assert_eq!(r.held_bytes(), 40);
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(r.ack(), 6);
        assert!(!r.has_hole());
        assert!(!r.take_resend());
    }

    #[test]
    fn reorder_drops_what_does_not_fit_and_asks_for_a_resend() {
        // Room for two held frames of 20 bytes.
        let mut r = Reorder::new(RecvState::new(), 40);
        let mut got = Vec::new();
        for seq in [1u64, 2, 3] {
            r.arrive(seq, data(seq as u8), |f| got.push(f.payload[0]));
        }
        assert!(got.is_empty());
        assert!(r.take_resend(), "frame 3 was dropped");
        assert!(!r.take_resend(), "the flag is taken once");
        r.arrive(0, data(0), |f| got.push(f.payload[0]));
        assert_eq!(got, vec![0, 1, 2]);
        // The sender resends from the ack: 3 arrives again and goes through.
        r.arrive(3, data(3), |f| got.push(f.payload[0]));
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(r.held_bytes(), 0);
    }

    /// Several exchanges in flight, answered in any order, some cut: the receiver gets every
    /// frame once and in order, as long as the sender goes back to the ack after a cut.
    #[test]
    fn pipelined_exchanges_answered_out_of_order_lose_and_duplicate_nothing() {
        for seed in 1..=50u64 {
            pipelined_run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }

    fn pipelined_run(mut seed: u64) {
        let mut sender = SendBuffer::new();
        let mut next_send = 0u64;
        let mut r = Reorder::new(RecvState::new(), 200);
        let mut delivered = Vec::new();
        let mut produced = 0u8;
        let mut in_flight: Vec<Vec<(u64, Frame)>> = Vec::new();
        let mut round = 0usize;
        // A fixed pseudo-random sequence (xorshift), so a failure can be replayed.
        let mut random = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        while delivered.len() < 300 {
            round += 1;
            assert!(
                round < 10_000,
                "seed {seed:#x}: no progress after {} frames",
                delivered.len()
            );
            for _ in 0..random(5) {
                sender.push(data(produced));
                produced = produced.wrapping_add(1);
            }
            // Up to three exchanges in flight, each carrying the next range.
            while in_flight.len() < 3 && sender.has_from(next_send) {
                let from = next_send.max(sender.base());
                let (out, n) = sender.encode_batch(from, 0, 50);
                let out = out.into_bytes();
                next_send = from + n as u64;
                in_flight.push(decode_batch(&out).unwrap().1);
            }
            if in_flight.is_empty() {
                continue;
            }
            // One of them completes: which one, and whether it is cut, varies.
            let batch = in_flight.remove(random(in_flight.len()));
            let cut = random(3) == 0;
            let keep = if cut {
                random(batch.len() + 1)
            } else {
                batch.len()
            };
            for (seq, f) in batch.into_iter().take(keep) {
                r.arrive(seq, f, |f| delivered.push(f.payload[0]));
            }
            sender.ack(r.ack()).unwrap();
            if cut || r.take_resend() {
                next_send = r.ack();
            }
        }
        for (i, b) in delivered.iter().enumerate() {
            assert_eq!(*b, i as u8, "frame {i} out of order or duplicated");
        }
    }
}
