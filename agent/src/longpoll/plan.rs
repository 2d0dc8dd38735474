//! When long-poll sends its polls and pushes, without IO: how many are in flight, when a lost
//! one makes the rest go again, when one counts as stuck, and how long to wait after failures.
//! The poll and push loops of [`crate::link`] carry out what these plans decide and report back
//! what happened; the plans are tested here with simulated time.
//!
//! The rules (docs/protocol.md, "Reliability"): several polls and pushes are in flight, each its
//! own HTTP exchange as strict proxies need. After a loss one goes at a time, and one more after
//! each that gets through, so a path that cuts connections does not cut four at once. An
//! exchange that takes over three times the smoothed time of those that got through, plus
//! 100 ms, is taken as stuck on a stalled connection, and what it carried goes again.

use backhaul_common::backoff::Backoff;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Polls held while the link is quiet, and at most while the relay fills them; pushes in flight
/// at most. Each is one HTTP exchange of its own, as strict proxies need.
pub const QUIET_POLLS: usize = 2;
pub const BUSY_POLLS: usize = 4;
pub const MAX_PUSHES: usize = 4;
/// Exchanges cut half-way in a row that are retried at once before backing off.
pub const QUICK_CUTS: u32 = 16;
/// Smallest push batch the agent shrinks to after failed pushes.
pub const MIN_PUSH_BATCH: usize = 16 * 1024;
/// Retry delays for an exchange or connection that failed twice in a row (the first retry is
/// immediate).
pub const RETRY_INITIAL: Duration = Duration::from_millis(50);
pub const RETRY_MAX: Duration = Duration::from_secs(2);
/// Added to three smoothed exchange times before an exchange counts as stuck.
const STUCK_MARGIN: Duration = Duration::from_millis(100);

/// How the next exchange goes after a failed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The first failure after a success: at once (a proxy cutting a connection is routine).
    AtOnce,
    /// Cut half-way on an established connection: at once, up to [`QUICK_CUTS`] in a row.
    AfterCut,
    /// Failures in a row: after this pause (jittered backoff).
    Paused(Duration),
}

/// Retry pacing after failures, one per loop.
#[derive(Debug)]
struct Retries {
    backoff: Backoff,
    quick_cuts: u32,
    paused: Option<Instant>,
}

impl Retries {
    fn new() -> Self {
        Self {
            backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX),
            quick_cuts: 0,
            paused: None,
        }
    }

    fn success(&mut self) {
        self.backoff.reset();
        self.quick_cuts = 0;
    }

    fn failed(&mut self, now: Instant) -> Retry {
        if self.backoff.attempts() == 0 {
            self.backoff.next_delay();
            return Retry::AtOnce;
        }
        let d = self.backoff.next_delay();
        self.paused = Some(now + d);
        Retry::Paused(d)
    }

    fn cut(&mut self, now: Instant) -> Retry {
        self.quick_cuts += 1;
        if self.quick_cuts > QUICK_CUTS {
            return self.failed(now);
        }
        Retry::AfterCut
    }

    fn is_paused(&self) -> bool {
        self.paused.is_some()
    }
}

/// Adds one exchange time to a smoothed one (RFC 6298's 1/8 gain).
fn smooth(srtt: Option<Duration>, took: Duration) -> Duration {
    srtt.map_or(took, |s| (s * 7 + took) / 8)
}

/// How a push ended, as far as scheduling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushEnd {
    /// The relay took it in; `all` unless it answered before the push's turn came.
    Taken {
        all: bool,
    },
    /// Cut half-way on an established connection.
    Cut,
    Failed,
}

/// The push loop's schedule.
#[derive(Debug)]
pub struct PushPlan {
    max_batch: usize,
    /// Shrinks after failures so pushes get through paths that cut long requests, and grows
    /// back after successes.
    batch_limit: usize,
    /// The next frame to send; below the send buffer's base means "from the base".
    next: u64,
    allowed: usize,
    /// When each push in flight started, by ID. After a loss every push in flight is dropped,
    /// so these are always the pushes sent since the last loss.
    in_flight: BTreeMap<u64, Instant>,
    last_id: u64,
    srtt: Option<Duration>,
    retries: Retries,
}

impl PushPlan {
    pub fn new(max_batch: usize) -> Self {
        Self {
            max_batch,
            batch_limit: max_batch,
            next: 0,
            allowed: MAX_PUSHES,
            in_flight: BTreeMap::new(),
            last_id: 0,
            srtt: None,
            retries: Retries::new(),
        }
    }

    /// Whether there is room for another push in flight.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.allowed
    }

    /// Whether another push may start now: room, and no pause after failures.
    pub fn may_start(&self) -> bool {
        self.has_room() && !self.retries.is_paused()
    }

    /// Where the next push's frames start (a number below the send buffer's base means the
    /// base), and about how many bytes it may carry.
    pub fn next_range(&self) -> (u64, usize) {
        (self.next, self.batch_limit)
    }

    /// A push of the frames before `end` started; returns its ID.
    pub fn started(&mut self, end: u64, now: Instant) -> u64 {
        self.next = end;
        self.last_id += 1;
        self.in_flight.insert(self.last_id, now);
        self.last_id
    }

    /// Push `id` ended. Returns whether the pushes in flight are lost (drop them: sending
    /// starts again from the relay's ack), and how to retry after a failure.
    pub fn finished(&mut self, id: u64, end: PushEnd, now: Instant) -> (bool, Option<Retry>) {
        let Some(started) = self.in_flight.remove(&id) else {
            return (false, None); // dropped after a loss; it counts for nothing
        };
        let (lost, retry) = match end {
            PushEnd::Taken { all } => {
                if all {
                    self.srtt = Some(smooth(self.srtt, now - started));
                }
                self.retries.success();
                self.allowed = (self.allowed + 1).min(MAX_PUSHES);
                self.batch_limit = (self.batch_limit * 2).min(self.max_batch);
                // Answered before its turn came: what it carried goes again.
                (!all, None)
            }
            PushEnd::Cut => {
                self.shrink();
                (true, Some(self.retries.cut(now)))
            }
            PushEnd::Failed => {
                self.shrink();
                (true, Some(self.retries.failed(now)))
            }
        };
        if lost {
            self.lose();
        }
        (lost, retry)
    }

    fn shrink(&mut self) {
        self.batch_limit = (self.batch_limit / 2).max(MIN_PUSH_BATCH);
    }

    fn lose(&mut self) {
        self.next = 0;
        self.allowed = 1;
        self.in_flight.clear();
    }

    /// How long the oldest push may be pending before it counts as stuck.
    pub fn stuck_after(&self) -> Option<Duration> {
        self.srtt.map(|d| d * 3 + STUCK_MARGIN)
    }

    /// When [`PushPlan::on_timer`] is due: a pause ends, or the oldest push becomes stuck.
    pub fn timer(&self) -> Option<Instant> {
        let oldest = self.in_flight.values().next().copied();
        let stuck_at = oldest.zip(self.stuck_after()).map(|(t, d)| t + d);
        [self.retries.paused, stuck_at].into_iter().flatten().min()
    }

    /// Time has come to `now`. Returns true when the oldest push is stuck, and with it the
    /// pushes in flight are lost (drop them).
    pub fn on_timer(&mut self, now: Instant) -> bool {
        if self.retries.paused.is_some_and(|t| t <= now) {
            self.retries.paused = None;
        }
        let oldest = self.in_flight.values().next().copied();
        let stuck = oldest
            .zip(self.stuck_after())
            .is_some_and(|(t, d)| t + d <= now);
        if stuck {
            self.lose();
        }
        stuck
    }
}

/// How a poll ended, as far as scheduling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollEnd {
    Progress,
    /// Cut after some whole frames arrived: progress, but the rest must be sent again.
    Cut,
    /// Cut on an established connection before anything arrived.
    CutEarly,
    Failed,
}

/// A poll that ended: its round, when it started, how it ended and the bytes it brought.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    pub round: u64,
    pub started: Instant,
    pub end: PollEnd,
    pub received: usize,
}

/// What the poll loop does after a poll ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollVerdict {
    /// The poll was of the current round (an older round's poll lost nothing: the relay gave
    /// its range again, or none).
    pub current: bool,
    /// Start a new round ([`PollPlan::new_round`]): the relay sends again from our ack.
    pub restart: bool,
    pub retry: Option<Retry>,
}

/// The poll loop's schedule. Polls go in rounds (see the relay's `Hub::poll`): a new round
/// makes the relay send again from the agent's ack; polls of older rounds finish on their own
/// (the relay answers them empty) and hold no place.
#[derive(Debug)]
pub struct PollPlan {
    round: u64,
    hold: Duration,
    max_batch: usize,
    /// The relay filled the last poll at least half: hold more polls.
    busy: bool,
    /// Polls of this round in flight.
    live: usize,
    allowed: usize,
    /// Since when frames wait past a hole, and how long polls that bring frames take
    /// (smoothed): a hole older than a few of those means the poll that carried its frames
    /// is stuck (a stalled connection), so a new round has them sent again at once rather
    /// than after that poll's timeout.
    hole_since: Option<Instant>,
    srtt: Option<Duration>,
    retries: Retries,
}

impl PollPlan {
    /// A plan starting at `round`, for a relay that holds polls for `hold` and fills them up
    /// to `max_batch` bytes.
    pub fn new(round: u64, hold: Duration, max_batch: usize) -> Self {
        Self {
            round,
            hold,
            max_batch,
            busy: false,
            live: 0,
            allowed: BUSY_POLLS,
            hole_since: None,
            srtt: None,
            retries: Retries::new(),
        }
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    /// How many polls to start now, with `in_flight` polls of any round pending.
    pub fn to_start(&self, in_flight: usize) -> usize {
        if self.retries.is_paused() {
            return 0;
        }
        let target = if self.busy { BUSY_POLLS } else { QUIET_POLLS }.min(self.allowed);
        let by_round = target.saturating_sub(self.live);
        let by_total = (2 * BUSY_POLLS).saturating_sub(in_flight);
        by_round.min(by_total)
    }

    /// A poll starts; returns the round it belongs to.
    pub fn started(&mut self) -> u64 {
        self.live += 1;
        self.round
    }

    /// Starts round `round` (larger than any before): polls of the old one hold no place, and
    /// one goes at first.
    pub fn new_round(&mut self, round: u64) {
        self.round = round;
        self.live = 0;
        self.allowed = 1;
    }

    /// A poll ended. `hole` and `resend` are the reorder buffer's state after it: frames wait
    /// past a hole, and frames were dropped for lack of room.
    pub fn finished(&mut self, poll: Poll, hole: bool, resend: bool, now: Instant) -> PollVerdict {
        let Poll {
            round,
            started,
            end,
            received,
        } = poll;
        if received > backhaul_common::wire::BATCH_HEADER_LEN {
            self.srtt = Some(smooth(self.srtt, now - started));
        }
        let current = round == self.round;
        if current {
            self.live -= 1;
        }
        self.busy = received >= self.max_batch / 2;
        if !hole {
            self.hole_since = None;
        } else if self.hole_since.is_none() {
            self.hole_since = Some(now);
        }
        let (lost, retry) = match end {
            PollEnd::Progress => {
                self.retries.success();
                self.allowed = (self.allowed + 1).min(BUSY_POLLS);
                (false, None)
            }
            PollEnd::Cut => {
                self.retries.success();
                (true, None)
            }
            PollEnd::CutEarly => (true, current.then(|| self.retries.cut(now))),
            PollEnd::Failed => (true, current.then(|| self.retries.failed(now))),
        };
        PollVerdict {
            current,
            restart: if lost { current } else { resend },
            retry,
        }
    }

    /// How long frames may wait past a hole before their poll counts as stuck.
    pub fn hole_timeout(&self) -> Duration {
        self.srtt
            .map_or(self.hold, |d| (d * 3 + STUCK_MARGIN).min(self.hold))
    }

    /// When [`PollPlan::on_timer`] is due: a pause ends, or a hole has waited too long.
    pub fn timer(&self) -> Option<Instant> {
        let hole_at = self.hole_since.map(|t| t + self.hole_timeout());
        [self.retries.paused, hole_at].into_iter().flatten().min()
    }

    /// Time has come to `now`. Returns true when frames have waited past a hole too long:
    /// start a new round ([`PollPlan::new_round`]).
    pub fn on_timer(&mut self, now: Instant) -> bool {
        if self.retries.paused.is_some_and(|t| t <= now) {
            self.retries.paused = None;
        }
        let stuck = self
            .hole_since
            .is_some_and(|t| t + self.hole_timeout() <= now);
        if stuck {
            // Measured again from the new round.
            self.hole_since = Some(now);
        }
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn poll(round: u64, started: Instant, end: PollEnd, received: usize) -> Poll {
        Poll {
            round,
            started,
            end,
            received,
        }
    }

    #[test]
    fn pushes_fill_the_pipe_and_after_a_loss_start_again_one_at_a_time() {
        let t0 = Instant::now();
        let mut p = PushPlan::new(1 << 20);
        let ids: Vec<u64> = (1..=4)
            .map(|end| {
                assert!(p.may_start());
                p.started(end * 10, t0)
            })
            .collect();
        assert!(!p.may_start(), "four in flight at most");
        assert_eq!(p.next_range(), (40, 1 << 20));
        // The second fails: every push in flight is lost, sending restarts from the ack.
        assert_eq!(
            p.finished(ids[1], PushEnd::Failed, t0 + 50 * MS),
            (true, Some(Retry::AtOnce))
        );
        assert_eq!(
            p.next_range(),
            (0, 512 << 10),
            "from the ack, half the size"
        );
        // Those still pending count for nothing when they end.
        assert_eq!(
            p.finished(ids[0], PushEnd::Cut, t0 + 60 * MS),
            (false, None)
        );
        // One at a time, then one more after each success.
        let a = p.started(10, t0 + 60 * MS);
        assert!(!p.may_start());
        assert_eq!(
            p.finished(a, PushEnd::Taken { all: true }, t0 + 110 * MS),
            (false, None)
        );
        p.started(20, t0 + 110 * MS);
        assert!(p.may_start());
        p.started(30, t0 + 110 * MS);
        assert!(!p.may_start());
        assert_eq!(p.next_range(), (30, 1 << 20), "the size grew back");
    }

    #[test]
    fn failures_in_a_row_back_off_and_quick_cuts_go_at_once_for_a_while() {
        let t0 = Instant::now();
        let mut p = PushPlan::new(1 << 20);
        let id = p.started(1, t0);
        assert_eq!(p.finished(id, PushEnd::Failed, t0).1, Some(Retry::AtOnce));
        let id = p.started(1, t0);
        let Some(Retry::Paused(d)) = p.finished(id, PushEnd::Failed, t0).1 else {
            panic!("a second failure in a row pauses")
        };
        assert!(d >= 50 * MS && d <= 100 * MS, "{d:?}");
        assert!(!p.may_start());
        assert_eq!(p.timer(), Some(t0 + d));
        assert!(!p.on_timer(t0 + d));
        assert!(p.may_start(), "the pause is over");
        // Cuts on an established connection go again at once, QUICK_CUTS times in a row.
        for _ in 0..QUICK_CUTS {
            let id = p.started(1, t0);
            assert_eq!(p.finished(id, PushEnd::Cut, t0).1, Some(Retry::AfterCut));
        }
        let id = p.started(1, t0);
        assert!(matches!(
            p.finished(id, PushEnd::Cut, t0).1,
            Some(Retry::Paused(_))
        ));
        assert_eq!(p.next_range().1, MIN_PUSH_BATCH, "shrunk down to the floor");
    }

    #[test]
    fn a_push_pending_three_times_the_usual_plus_100_ms_is_stuck() {
        let t0 = Instant::now();
        let mut p = PushPlan::new(1 << 20);
        let id = p.started(1, t0);
        assert_eq!(
            p.timer(),
            None,
            "nothing measured yet: only the push's timeout"
        );
        p.finished(id, PushEnd::Taken { all: true }, t0 + 40 * MS);
        let first = p.started(2, t0 + 40 * MS);
        let _second = p.started(3, t0 + 50 * MS);
        assert_eq!(p.stuck_after(), Some(220 * MS));
        assert_eq!(p.timer(), Some(t0 + 260 * MS), "the oldest one's");
        assert!(!p.on_timer(t0 + 259 * MS));
        assert!(p.on_timer(t0 + 260 * MS));
        assert_eq!(p.next_range().0, 0, "sending starts again from the ack");
        assert!(!p.finished(first, PushEnd::Taken { all: true }, t0).0);
        assert_eq!(p.timer(), None);
    }

    #[test]
    fn a_push_answered_before_its_turn_makes_the_rest_go_again() {
        let t0 = Instant::now();
        let mut p = PushPlan::new(1 << 20);
        let a = p.started(5, t0);
        p.started(9, t0);
        assert_eq!(
            p.finished(a, PushEnd::Taken { all: false }, t0 + 10 * MS),
            (true, None)
        );
        assert_eq!(p.next_range().0, 0);
        assert_eq!(p.stuck_after(), None, "only whole pushes are timed");
    }

    #[test]
    fn polls_hold_two_when_quiet_four_when_busy_and_a_lost_one_starts_a_new_round() {
        let t0 = Instant::now();
        let mut p = PollPlan::new(7, Duration::from_secs(25), 1 << 20);
        assert_eq!(p.to_start(0), QUIET_POLLS);
        let (r1, r2) = (p.started(), p.started());
        assert_eq!((r1, r2, p.to_start(2)), (7, 7, 0));
        // A full answer: the relay has more, hold four.
        let v = p.finished(
            poll(7, t0, PollEnd::Progress, 1 << 20),
            false,
            false,
            t0 + 30 * MS,
        );
        assert_eq!((v.current, v.restart, v.retry), (true, false, None));
        assert_eq!(p.to_start(1), 3);
        for _ in 0..3 {
            p.started();
        }
        // One is lost: a new round, one poll at first.
        let v = p.finished(poll(7, t0, PollEnd::Failed, 0), false, false, t0 + 40 * MS);
        assert_eq!(
            (v.current, v.restart, v.retry),
            (true, true, Some(Retry::AtOnce))
        );
        p.new_round(8);
        assert_eq!(p.to_start(3), 1);
        // Polls of the old round that end now lost nothing and hold no place.
        let v = p.finished(poll(7, t0, PollEnd::Cut, 100), false, false, t0 + 45 * MS);
        assert_eq!((v.current, v.restart), (false, false));
        assert_eq!(p.started(), 8);
        assert_eq!(p.to_start(3), 0);
        // Frames dropped for lack of room ask for a resend too.
        let v = p.finished(
            poll(8, t0, PollEnd::Progress, 100),
            false,
            true,
            t0 + 50 * MS,
        );
        assert!(v.restart);
        // Never more than 2 x BUSY_POLLS in flight, whatever the rounds.
        assert_eq!(p.to_start(2 * BUSY_POLLS), 0);
    }

    #[test]
    fn frames_waiting_past_a_hole_too_long_start_a_new_round() {
        let t0 = Instant::now();
        let hold = Duration::from_secs(25);
        let mut p = PollPlan::new(1, hold, 1 << 20);
        assert_eq!(p.hole_timeout(), hold, "nothing measured: the hold time");
        p.started();
        p.started();
        // A poll brings frames after 50 ms, but past a hole (the other poll is stuck).
        let v = p.finished(
            poll(1, t0, PollEnd::Progress, 4096),
            true,
            false,
            t0 + 50 * MS,
        );
        assert!(!v.restart);
        assert_eq!(p.hole_timeout(), 250 * MS);
        assert_eq!(p.timer(), Some(t0 + 300 * MS));
        assert!(!p.on_timer(t0 + 299 * MS));
        assert!(p.on_timer(t0 + 300 * MS), "the hole waited too long");
        assert_eq!(
            p.timer(),
            Some(t0 + 550 * MS),
            "measured again from the new round"
        );
        // The hole fills: no timer.
        p.new_round(2);
        p.started();
        p.finished(
            poll(2, t0, PollEnd::Progress, 4096),
            false,
            false,
            t0 + 400 * MS,
        );
        assert_eq!(p.timer(), None);
    }
}
