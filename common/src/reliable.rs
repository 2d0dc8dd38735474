//! Sequence numbers, acknowledgements and retransmission for one direction of the agent link.
//! No IO here: the relay and the agent drive these from their HTTP handlers.
//!
//! Each direction numbers its frames 0, 1, 2, ... The sender keeps every frame until the receiver
//! acknowledges it (`ack` = the receiver's next expected sequence number), and every batch it
//! sends starts from a sequence number the receiver asked for or already acknowledged. So an HTTP
//! exchange cut half-way costs a retransmission, never a loss; the receiver drops the
//! duplicates, so nothing is delivered twice.

use crate::wire::{BatchHeader, Frame};
use bytes::BytesMut;
use std::collections::VecDeque;

/// The sending half: frames not yet acknowledged, oldest first.
#[derive(Debug, Default)]
pub struct SendBuffer {
    /// Sequence number of `frames[0]`.
    base: u64,
    frames: VecDeque<Frame>,
    bytes: usize,
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
        self.frames.push_back(frame);
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
            if let Some(f) = self.frames.pop_front() {
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

    /// Encodes a batch into `out`: the header (carrying `peer_ack` for the other direction) and the
    /// frames from `from` on, up to about `max_bytes` (at least one frame when there is one).
    /// Returns the number of frames written. `from` below the buffer's base starts at the base.
    pub fn encode_batch(
        &self,
        from: u64,
        peer_ack: u64,
        max_bytes: usize,
        out: &mut BytesMut,
    ) -> usize {
        let from = from.max(self.base);
        BatchHeader {
            ack: peer_ack,
            first_seq: from,
        }
        .encode(out);
        let skip = (from - self.base) as usize;
        let mut written = 0;
        let mut size = 0;
        for f in self.frames.iter().skip(skip) {
            if written > 0 && size + f.encoded_len() > max_bytes {
                break;
            }
            size += f.encoded_len();
            f.encode(out);
            written += 1;
        }
        written
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
    Batch(bytes::Bytes),
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
    pub fn next_batch(&mut self, buf: &SendBuffer, ack: u64, force: bool) -> StreamNext {
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
        let mut out = BytesMut::new();
        let from = self.next.max(buf.base());
        let n = buf.encode_batch(from, ack, self.limit, &mut out);
        self.next = from + n as u64;
        self.acked = Some(ack);
        StreamNext::Batch(out.freeze())
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
        let StreamNext::Batch(b) = c.next_batch(&s, 7, false) else {
            panic!("expected a batch")
        };
        let (h, frames) = decode_batch(&b).unwrap();
        assert_eq!((h.ack, h.first_seq, frames.len()), (7, 0, 2));
        let StreamNext::Batch(b) = c.next_batch(&s, 7, false) else {
            panic!("expected a batch")
        };
        assert_eq!(decode_batch(&b).unwrap().1.len(), 2);
        assert!(matches!(c.next_batch(&s, 7, false), StreamNext::Idle));
        assert!(matches!(c.next_batch(&s, 8, false), StreamNext::AckDue));
        let StreamNext::Batch(b) = c.next_batch(&s, 8, true) else {
            panic!("expected a heartbeat")
        };
        let (h, frames) = decode_batch(&b).unwrap();
        assert_eq!((h.ack, h.first_seq, frames.len()), (8, 4, 0));
        // The peer's ack grows the batch limit.
        s.ack(1).unwrap();
        assert!(matches!(c.next_batch(&s, 8, false), StreamNext::Idle));
        assert_eq!(c.limit(), 90);
        // A new connection after the peer acknowledged 1: frames 1.. go again.
        let mut c = StreamCursor::new(1, 1000, 1000);
        let StreamNext::Batch(b) = c.next_batch(&s, 8, false) else {
            panic!("expected a batch")
        };
        let (h, frames) = decode_batch(&b).unwrap();
        assert_eq!((h.first_seq, frames.len()), (1, 3));
    }

    #[test]
    fn batches_respect_from_and_size() {
        let mut s = SendBuffer::new();
        for i in 0..10 {
            s.push(data(i));
        }
        let mut out = BytesMut::new();
        let n = s.encode_batch(3, 77, 45, &mut out);
        assert_eq!(n, 2);
        let (h, frames) = decode_batch(&out).unwrap();
        assert_eq!((h.ack, h.first_seq), (77, 3));
        assert_eq!(frames[0], (3, data(3)));
        assert_eq!(frames[1], (4, data(4)));

        // A frame larger than the budget still goes alone, so progress is always possible.
        let mut out = BytesMut::new();
        assert_eq!(s.encode_batch(0, 0, 1, &mut out), 1);
        // Nothing to send: a header-only batch that still carries the ack.
        let mut out = BytesMut::new();
        assert_eq!(s.encode_batch(10, 5, 1000, &mut out), 0);
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
            let mut out = BytesMut::new();
            let n = sender.encode_batch(sender.base(), 0, 60, &mut out);
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
}
