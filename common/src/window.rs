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
//! IO-free: the pump asks [`ReceiveWindow::grow`] and grants what it returns.

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

/// One direction's receive window as its receiver holds it. The current size is shared with the
/// link's side of the session, which checks arriving frames against it.
#[derive(Debug)]
pub struct ReceiveWindow {
    current: Arc<AtomicUsize>,
    max: usize,
    budget: Arc<Budget>,
    /// Growth taken from the budget, given back on drop.
    grown: usize,
}

impl ReceiveWindow {
    pub fn new(cfg: &WindowConfig) -> Self {
        Self {
            current: Arc::new(AtomicUsize::new(cfg.initial as usize)),
            max: (cfg.max.max(cfg.initial)) as usize,
            budget: cfg.budget.clone(),
            grown: 0,
        }
    }

    /// The window's current size, for checking what arrives.
    pub fn shared(&self) -> Arc<AtomicUsize> {
        self.current.clone()
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// Call when the sender said it was held back by the window and everything it sent has
    /// been written out: the window, not the reader, is what slows the session. Doubles the
    /// window (as far as the maximum and the budget allow) and returns the extra credit to
    /// grant now; 0 when it cannot grow.
    pub fn grow(&mut self) -> usize {
        let cur = self.current();
        let want = cur.min(self.max.saturating_sub(cur));
        let got = self.budget.take(want);
        if got > 0 {
            // Raised before the credit is granted, so what the credit lets in is accepted.
            self.current.fetch_add(got, Ordering::AcqRel);
            self.grown += got;
        }
        got
    }
}

impl ReceiveWindow {
    /// The sender gave back `credit` it no longer needs (see [`crate::wire::Kind::Return`]):
    /// the window shrinks by it and the growth goes back to the budget, for sessions that need
    /// it now. A window never shrinks below where it started. Returns the bytes given back.
    pub fn give_back(&mut self, credit: usize) -> usize {
        let n = credit.min(self.grown);
        if n > 0 {
            self.current.fetch_sub(n, Ordering::AcqRel);
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
}
