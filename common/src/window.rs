//! Flow-control windows that grow to fit the path. A session starts with a small window each
//! way (what an idle session costs); when its sender is held back by the window while the
//! receiver keeps up with everything that arrives, the path's bandwidth-delay product is larger
//! than the window, and the receiver doubles it, up to a maximum and within a budget shared by
//! all sessions of the process. This is the receiver-driven auto-tuning of HTTP/2 and QUIC
//! stacks, with the sender's "blocked" signal of QUIC (STREAM_DATA_BLOCKED) carried as a flag on
//! the frame that used up its credit (see [`crate::wire::FLAG_BLOCKED`]).
//!
//! A grown window costs nothing while the session is idle, but it holds budget that busy
//! sessions could use. So a sender that has been idle for [`IDLE_RETURN`] with more credit than
//! the initial window gives the excess back (a RETURN frame), and its receiver shrinks the
//! window and returns the growth to the budget ([`ReceiveWindow::give_back`]). The next burst
//! grows it again, doubling each round trip.
//!
//! IO-free: [`SessionFlow`] holds a session's credit and window both ways and decides; the
//! session's pump and the link's side of it (`crate::session`) feed it and carry out what it says.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a sender holding more than the initial window may send nothing before it gives the
/// excess back.
pub const IDLE_RETURN: Duration = Duration::from_secs(10);

/// How a process sizes its sessions' windows.
#[derive(Debug, Clone)]
pub struct WindowConfig {
    /// Every session's window, each way, when it starts.
    pub initial: u32,
    /// The most a session's window may grow to.
    pub max: u32,
    /// Bytes above the initial windows that all sessions together may be granted.
    pub budget: Arc<Budget>,
}

impl WindowConfig {
    /// Fixed windows: no growth.
    pub fn fixed(window: u32) -> Self {
        Self {
            initial: window,
            max: window,
            budget: Budget::new(0),
        }
    }
}

/// Bytes of window growth a process may hand out in all.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes up to `want` bytes; returns what it could take.
    fn take(&self, want: usize) -> usize {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let got = want.min(self.limit.saturating_sub(used));
            if got == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + got,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return got,
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Growth handed out now, in bytes.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One direction's receive window as its receiver holds it.
#[derive(Debug)]
pub struct ReceiveWindow {
    current: usize,
    max: usize,
    budget: Arc<Budget>,
    /// Growth taken from the budget, given back on drop.
    grown: usize,
}

impl ReceiveWindow {
    pub fn new(cfg: &WindowConfig) -> Self {
        Self {
            current: cfg.initial as usize,
            max: (cfg.max.max(cfg.initial)) as usize,
            budget: cfg.budget.clone(),
            grown: 0,
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// Call when the sender said it was held back by the window and everything it sent has
    /// been written out: the window, not the reader, is what slows the session. Doubles the
    /// window (as far as the maximum and the budget allow) and returns the extra credit to
    /// grant now; 0 when it cannot grow.
    pub fn grow(&mut self) -> usize {
        let cur = self.current;
        let want = cur.min(self.max.saturating_sub(cur));
        let got = self.budget.take(want);
        self.current += got;
        self.grown += got;
        got
    }

    /// The sender gave back `credit` it no longer needs (see [`crate::wire::Kind::Return`]):
    /// the window shrinks by it and the growth goes back to the budget, for sessions that need
    /// it now. A window never shrinks below where it started. Returns the bytes given back.
    pub fn give_back(&mut self, credit: usize) -> usize {
        let n = credit.min(self.grown);
        if n > 0 {
            self.current -= n;
            self.grown -= n;
            self.budget.give(n);
        }
        n
    }
}

impl Drop for ReceiveWindow {
    fn drop(&mut self) {
        self.budget.give(self.grown);
    }
}

/// A frame from the link broke the session's rules; the session must be dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionViolation {
    #[error("peer sent {queued} bytes of DATA against a window of {window}")]
    WindowExceeded { queued: usize, window: usize },
    #[error("peer granted {credit} bytes of window, more than it could have consumed")]
    CreditOverflow { credit: u32 },
    #[error("malformed {0:?} frame")]
    Malformed(crate::wire::Kind),
}

/// What the sender may do with a piece that costs some window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Send it. `blocked`: too little credit is left for another full piece, so the frame
    /// carries BLOCKED ([`crate::wire::FLAG_BLOCKED`]).
    Go { blocked: bool },
    /// Not enough credit: wait for the receiver's WINDOW.
    Wait,
    /// The session is over.
    Closed,
}

/// Flow control of one session, both directions, in one place and without IO: the link's
/// side feeds it the WINDOW, RETURN and data frames that arrive, the session's pump asks it
/// before sending a piece and tells it what it has written out. It answers with what to send
/// (credit to grant, window to give back) and whether the sender must wait; the caller does
/// the sending and the waiting.
///
/// Costs are in window bytes: a frame's payload plus [`crate::session::FRAME_COST`].
#[derive(Debug)]
pub struct SessionFlow {
    // Sending: what we may still send, and what the peer's windows allow at most.
    credit: usize,
    max_credit: usize,
    initial: usize,
    /// The largest piece's cost: with less credit than this we are window-limited.
    full_piece: usize,
    /// Set once we were window-limited: from then on the window may have grown, and credit
    /// beyond the initial window goes back when we fall idle.
    may_hold_growth: bool,
    // Receiving: our window, what arrived and is not written out yet, and what was written
    // out and not yet granted back.
    window: ReceiveWindow,
    queued: usize,
    consumed: usize,
    closed: bool,
}

impl SessionFlow {
    /// Both directions start at `cfg.initial`; the largest piece the sender sends costs
    /// `full_piece`.
    pub fn new(cfg: &WindowConfig, full_piece: usize) -> Self {
        Self {
            credit: cfg.initial as usize,
            max_credit: cfg.max.max(cfg.initial) as usize,
            initial: cfg.initial as usize,
            full_piece,
            may_hold_growth: false,
            window: ReceiveWindow::new(cfg),
            queued: 0,
            consumed: 0,
            closed: false,
        }
    }

    /// Sending: spends `cost` if the credit covers it.
    pub fn spend(&mut self, cost: usize) -> Spend {
        if self.closed {
            return Spend::Closed;
        }
        if cost > self.credit {
            return Spend::Wait;
        }
        self.credit -= cost;
        let blocked = self.credit < self.full_piece;
        self.may_hold_growth |= blocked;
        Spend::Go { blocked }
    }

    /// Sending: the receiver granted `credit` (a WINDOW frame).
    pub fn credit(&mut self, credit: u32) -> Result<(), SessionViolation> {
        if self.credit + credit as usize > self.max_credit {
            return Err(SessionViolation::CreditOverflow { credit });
        }
        self.credit += credit as usize;
        Ok(())
    }

    /// Sending: whether the driver should tell us when the sender has been idle for
    /// [`IDLE_RETURN`] (see [`SessionFlow::idle`]).
    pub fn may_hold_growth(&self) -> bool {
        self.may_hold_growth && !self.closed
    }

    /// Sending: the sender has sent nothing for [`IDLE_RETURN`]. Returns the credit to give
    /// back in a RETURN frame (what it holds above the initial window), already forgotten.
    pub fn idle(&mut self) -> Option<u32> {
        let excess = self.credit.saturating_sub(self.initial);
        if excess == 0 || self.closed {
            return None;
        }
        self.credit -= excess;
        Some(excess as u32)
    }

    /// Receiving: a frame costing `cost` arrived for the pump to write out.
    pub fn arrive(&mut self, cost: usize) -> Result<(), SessionViolation> {
        let queued = self.queued + cost;
        if queued > self.window.current() {
            return Err(SessionViolation::WindowExceeded {
                queued,
                window: self.window.current(),
            });
        }
        self.queued = queued;
        Ok(())
    }

    /// Receiving: the pump wrote out a frame costing `cost`; `blocked` if it carried BLOCKED.
    /// Returns the credit to grant now, if any. Credit goes back once the bytes are written,
    /// so a slow reader slows its writer, and usually in quarters of the window. A sender that
    /// is window-limited while we hold nothing else of its gets it at once, with the window
    /// grown: the path, not our reader, is what holds it back.
    pub fn written(&mut self, cost: usize, blocked: bool) -> Option<u32> {
        self.queued = self.queued.saturating_sub(cost);
        self.consumed += cost;
        let grant = if blocked && self.queued == 0 {
            self.consumed + self.window.grow()
        } else if self.consumed >= (self.window.current() / 4).max(1) {
            self.consumed
        } else {
            0
        };
        if grant == 0 || self.closed {
            return None;
        }
        self.consumed = 0;
        Some(grant as u32)
    }

    /// Receiving: the sender gave back `credit` (a RETURN frame); the window shrinks.
    pub fn give_back(&mut self, credit: u32) {
        self.window.give_back(credit as usize);
    }

    /// The window we enforce now.
    pub fn window(&self) -> usize {
        self.window.current()
    }

    /// The session is over: senders stop waiting, nothing more is granted.
    pub fn close(&mut self) {
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(initial: u32, max: u32, budget: usize) -> WindowConfig {
        WindowConfig {
            initial,
            max,
            budget: Budget::new(budget),
        }
    }

    #[test]
    fn doubles_up_to_the_maximum() {
        let mut w = ReceiveWindow::new(&cfg(100, 700, 1 << 20));
        assert_eq!(w.grow(), 100);
        assert_eq!(w.grow(), 200);
        assert_eq!(w.grow(), 300, "the last step stops at the maximum");
        assert_eq!(w.current(), 700);
        assert_eq!(w.grow(), 0);
    }

    #[test]
    fn sessions_share_the_budget_and_give_it_back() {
        let c = cfg(100, 10_000, 250);
        let mut a = ReceiveWindow::new(&c);
        let mut b = ReceiveWindow::new(&c);
        assert_eq!(a.grow(), 100);
        assert_eq!(b.grow(), 100);
        assert_eq!(a.grow(), 50, "only what is left of the budget");
        assert_eq!(b.grow(), 0);
        assert_eq!(c.budget.used(), 250);
        drop(a);
        assert_eq!(c.budget.used(), 100);
        assert_eq!(b.grow(), 150);
    }

    #[test]
    fn given_back_growth_returns_to_the_budget_and_never_below_the_start() {
        let c = cfg(100, 10_000, 300);
        let mut a = ReceiveWindow::new(&c);
        assert_eq!(a.grow(), 100);
        assert_eq!(a.grow(), 200);
        assert_eq!(c.budget.used(), 300);
        assert_eq!(a.give_back(250), 250);
        assert_eq!((a.current(), c.budget.used()), (150, 50));
        // A peer that gives back more than was grown cannot shrink the window below its start.
        assert_eq!(a.give_back(1000), 50);
        assert_eq!((a.current(), c.budget.used()), (100, 0));
        assert_eq!(a.grow(), 100, "it grows again");
        drop(a);
        assert_eq!(c.budget.used(), 0);
    }

    #[test]
    fn fixed_windows_never_grow() {
        let mut w = ReceiveWindow::new(&WindowConfig::fixed(512));
        assert_eq!(w.grow(), 0);
        assert_eq!(w.current(), 512);
    }

    /// One round trip of a session direction whose receiver writes out everything at once:
    /// `a` sends pieces of `piece` bytes while its credit lasts, `b` takes them in and writes
    /// them out, and its grants reach `a`. Returns the bytes sent.
    fn round_trip(a: &mut SessionFlow, b: &mut SessionFlow, piece: usize) -> usize {
        let mut sent = Vec::new();
        while let Spend::Go { blocked } = a.spend(piece) {
            sent.push(blocked);
        }
        for _ in &sent {
            b.arrive(piece).unwrap();
        }
        let grants: Vec<u32> = sent
            .iter()
            .filter_map(|&blocked| b.written(piece, blocked))
            .collect();
        for g in grants {
            a.credit(g).unwrap();
        }
        sent.len() * piece
    }

    #[test]
    fn a_direction_carries_its_window_and_no_more() {
        let c = cfg(1000, 1000, 0);
        let (mut a, mut b) = (SessionFlow::new(&c, 500), SessionFlow::new(&c, 500));
        assert_eq!(a.spend(500), Spend::Go { blocked: false });
        assert_eq!(a.spend(400), Spend::Go { blocked: true });
        assert_eq!(a.spend(101), Spend::Wait, "100 bytes of credit left");
        b.arrive(500).unwrap();
        b.arrive(400).unwrap();
        assert_eq!(
            b.arrive(101),
            Err(SessionViolation::WindowExceeded {
                queued: 1001,
                window: 1000
            })
        );
        // Written out, the first piece is granted back (a quarter of the window or more).
        assert_eq!(b.written(500, false), Some(500));
        a.credit(500).unwrap();
        assert_eq!(a.spend(600), Spend::Go { blocked: true });
        // A fixed window never grows, even for a blocked sender the receiver keeps up with.
        assert_eq!(b.written(400, true), Some(400));
        assert_eq!(b.window(), 1000);
        // A peer that grants more than could have been consumed is refused.
        a.credit(400).unwrap();
        assert_eq!(
            a.credit(601),
            Err(SessionViolation::CreditOverflow { credit: 601 })
        );
        a.close();
        assert_eq!(a.spend(1), Spend::Closed);
    }

    #[test]
    fn a_blocked_sender_grows_the_window_each_round_trip_up_to_the_maximum() {
        let c = cfg(1000, 8000, 1 << 20);
        let (mut a, mut b) = (SessionFlow::new(&c, 250), SessionFlow::new(&c, 250));
        let per_rtt: Vec<usize> = (0..6).map(|_| round_trip(&mut a, &mut b, 250)).collect();
        assert_eq!(per_rtt, vec![1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!((b.window(), c.budget.used()), (8000, 7000));
    }

    #[test]
    fn a_receiver_that_does_not_write_stops_its_sender_and_never_grows() {
        let c = cfg(1000, 8000, 1 << 20);
        let (mut a, mut b) = (SessionFlow::new(&c, 250), SessionFlow::new(&c, 250));
        let mut blocked_seen = false;
        while let Spend::Go { blocked } = a.spend(250) {
            b.arrive(250).unwrap();
            blocked_seen |= blocked;
        }
        assert!(blocked_seen);
        assert_eq!(a.spend(250), Spend::Wait);
        // The slow reader writes one piece: it still holds the rest, so the window stays.
        assert_eq!(b.written(250, true), Some(250));
        assert_eq!((b.window(), c.budget.used()), (1000, 0));
    }

    #[test]
    fn sessions_grow_within_the_budget_and_idle_ones_give_it_back() {
        let c = cfg(1000, 8000, 3000);
        let (mut a1, mut b1) = (SessionFlow::new(&c, 250), SessionFlow::new(&c, 250));
        let (mut a2, mut b2) = (SessionFlow::new(&c, 250), SessionFlow::new(&c, 250));
        for _ in 0..4 {
            round_trip(&mut a1, &mut b1, 250);
        }
        assert_eq!((b1.window(), c.budget.used()), (4000, 3000));
        // The budget is spent: the second session stays at its initial window.
        for _ in 0..4 {
            assert_eq!(round_trip(&mut a2, &mut b2, 250), 1000);
        }
        // The first falls idle holding its grown credit; it gives back what is above the
        // initial window, and the budget is there for the second.
        assert!(a1.may_hold_growth());
        assert_eq!(a1.idle(), Some(3000));
        assert_eq!(a1.idle(), None, "given back once");
        b1.give_back(3000);
        assert_eq!((b1.window(), c.budget.used()), (1000, 0));
        assert_eq!(round_trip(&mut a2, &mut b2, 250), 1000);
        assert_eq!(round_trip(&mut a2, &mut b2, 250), 2000, "now it grows");
        // The first carries on within its initial window, and grows again when it needs to.
        assert_eq!(round_trip(&mut a1, &mut b1, 250), 1000);
    }
}
