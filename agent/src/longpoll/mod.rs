//! The link over long-poll, the transport that passes any HTTP/1.1 proxy: a poll loop brings
//! the relay's frames in, a push loop sends ours, each request its own exchange. When they go
//! and what a failure means is decided by the IO-free plans in [`plan`]; the loops here carry
//! that out.

mod plan;

pub use plan::*;

use crate::body;
use crate::link::{
    cut_mid_way, describe, link_gone, lock, sleep_until_some, Link, Spell, LINK_GONE,
};
use crate::metrics::metrics;
use crate::transport::{Ended, Transport};
use backhaul_common::metrics::observe;
use backhaul_common::reliable::{RecvState, Reorder};
use backhaul_common::wire::{decode_batch, BatchReader};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

impl Link {
    /// Carries the link over long-poll until it ends, or until `retry_faster` has passed.
    pub(crate) async fn longpoll(
        self: &Arc<Self>,
        recv: &mut RecvState,
        tracker: &TaskTracker,
        retry_faster: Option<Duration>,
        note: &str,
    ) -> Spell {
        self.announce_transport(Transport::LongPoll, note);
        let deadline = async {
            match retry_faster {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        // One batch, which may exceed the batch size by a frame.
        let limit = backhaul_common::transport::max_message(self.info.max_batch_bytes as usize);
        let reorder = Mutex::new(Reorder::new(*recv, BUSY_POLLS * limit));
        let spell = tokio::select! {
            spell = self.poll_loop(&reorder, limit, tracker) => spell,
            spell = self.push_loop() => spell,
            _ = deadline => Spell::Ended(Ended::TryFaster),
        };
        // Whichever ended the spell, the next transport resumes from what was delivered.
        *recv = reorder
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_recv();
        spell
    }

    /// Brings the relay's frames in over long-polls: [`QUIET_POLLS`] held while the link is
    /// quiet (one answers as soon as the relay has something while the next is already
    /// waiting), up to [`BUSY_POLLS`] while the relay fills them. The relay hands each poll
    /// different frames, so answers may arrive out of order; [`Reorder`] puts them back.
    async fn poll_loop(
        self: &Arc<Self>,
        reorder: &Mutex<Reorder>,
        limit: usize,
        tracker: &TaskTracker,
    ) -> Spell {
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        // A new round with each long-poll spell (see longpoll::PollPlan).
        let mut plan = PollPlan::new(
            self.next_poll_round(),
            hold,
            self.info.max_batch_bytes as usize,
        );
        let mut polls = FuturesUnordered::new();
        loop {
            for _ in 0..plan.to_start(polls.len()) {
                let ack = lock(reorder).ack();
                let round = plan.started();
                let url = format!("{}/poll?ack={ack}&round={round}", self.url);
                let req = self.request(self.h1().get(url).timeout(hold + self.grace()));
                let poll = self.poll_once(req, reorder, limit, tracker);
                let started = Instant::now();
                polls.push(async move {
                    let outcome = poll.await;
                    observe(&metrics().exchange_seconds, "poll", started.elapsed());
                    (outcome, round, started)
                });
            }
            let ((outcome, received), round, started) = tokio::select! {
                Some(r) = polls.next() => r,
                _ = sleep_until_some(plan.timer()) => {
                    if plan.on_timer(Instant::now()) {
                        let ack = lock(reorder).ack();
                        debug!("frames waited past a hole for {:?}; asking the relay to send again from frame {ack}", plan.hole_timeout());
                        plan.new_round(self.next_poll_round());
                    }
                    continue;
                }
                _ = self.done.cancelled() => return Spell::Shutdown,
            };
            let (ack, resend, hole) = {
                let mut r = lock(reorder);
                (r.ack(), r.take_resend(), r.has_hole())
            };
            self.down_ack.store(ack, Ordering::Release);
            let (end, why) = match outcome {
                PollOutcome::LinkGone(why) => return Spell::LinkGone(why),
                PollOutcome::Progress => (PollEnd::Progress, None),
                // Its whole frames were taken in; the rest must come again.
                PollOutcome::Cut(why) => (PollEnd::Cut, Some(why)),
                PollOutcome::CutEarly(why) => (PollEnd::CutEarly, Some(why)),
                PollOutcome::Failed(why) => (PollEnd::Failed, Some(why)),
            };
            let now = Instant::now();
            let poll = Poll {
                round,
                started,
                end,
                received,
            };
            let v = plan.finished(poll, hole, resend, now);
            match (&why, v.current) {
                (Some(why), true) => {
                    log_retry("poll", why, v.retry);
                    debug!("poll lost ({why}); asking the relay to send again from frame {ack}");
                }
                (Some(why), false) => debug!("an overtaken poll ended ({why})"),
                // Frames were dropped for lack of room.
                (None, _) if v.restart => {
                    debug!("asking the relay to send again from frame {ack}")
                }
                (None, _) => {}
            }
            if v.restart {
                plan.new_round(self.next_poll_round());
            }
        }
    }

    /// Starts a new round of polls (see the relay's `Hub::poll`) and returns its number.
    fn next_poll_round(&self) -> u64 {
        self.poll_round.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// One poll; returns its outcome and the bytes it brought.
    async fn poll_once(
        self: &Arc<Self>,
        req: reqwest::RequestBuilder,
        reorder: &Mutex<Reorder>,
        limit: usize,
        tracker: &TaskTracker,
    ) -> (PollOutcome, usize) {
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.closed_under_us(&e);
                return (PollOutcome::failed(&e), 0);
            }
        };
        if link_gone(&resp) {
            return (PollOutcome::LinkGone(LINK_GONE.into()), 0);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body::error_text(resp).await;
            return (
                PollOutcome::Failed(format!("relay answered {status}: {body}")),
                0,
            );
        }
        let mut reader = BatchReader::new();
        let mut received = 0usize;
        let mut got_any = false;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let why = format!("poll response cut: {}", describe(&e));
                    let outcome = if got_any {
                        PollOutcome::Cut(why)
                    } else {
                        PollOutcome::Failed(why)
                    };
                    return (outcome, received);
                }
            };
            received += chunk.len();
            if received > limit {
                return (PollOutcome::Failed(format!(
                    "poll response over {limit} bytes; is something between agent and relay rewriting traffic?"
                )), received);
            }
            reader.push(&chunk);
            match reader.header() {
                Ok(Some(h)) if !got_any => {
                    if let Err(e) = lock(&self.out).ack(h.ack) {
                        return (
                            PollOutcome::LinkGone(format!("relay sent a bad ack: {e}")),
                            received,
                        );
                    }
                    got_any = true;
                }
                Ok(_) => {}
                Err(e) => {
                    return (
                        PollOutcome::LinkGone(format!("relay sent a bad batch: {e}")),
                        received,
                    )
                }
            }
            if let Err(why) = self.take_frames_reordered(&mut reader, reorder, tracker) {
                return (PollOutcome::LinkGone(why), received);
            }
        }
        match reader.finish() {
            Ok(_) => (PollOutcome::Progress, received),
            Err(e) if got_any => (
                PollOutcome::Cut(format!("poll response ended early: {e}")),
                received,
            ),
            Err(e) => (
                PollOutcome::Failed(format!("poll response ended early: {e}")),
                received,
            ),
        }
    }

    /// Sends our frames over pushes, up to [`MAX_PUSHES`] in flight, each with the next range
    /// of frames. The relay holds a push that overtook an earlier one until that one arrives;
    /// after a failed push, or one the relay answered without taking all of it in, sending
    /// starts again from the relay's ack (see longpoll::PushPlan).
    async fn push_loop(self: &Arc<Self>) -> Spell {
        let mut plan = PushPlan::new(self.info.max_batch_bytes as usize);
        // Dropped whenever the plan declares the pushes in flight lost.
        let mut pushes = FuturesUnordered::new();
        loop {
            let notified = self.out_notify.notified();
            while plan.may_start() {
                let (from, limit) = plan.next_range();
                let (body, end) = {
                    let mut out = lock(&self.out);
                    let from = from.max(out.base());
                    if !out.has_from(from) {
                        break;
                    }
                    // A push body is one buffer: a proxy may need its length up front.
                    let (batch, n) =
                        out.encode_batch(from, self.down_ack.load(Ordering::Acquire), limit);
                    metrics().frames_resent.inc_by(out.take_resent());
                    (batch.into_bytes(), from + n as u64)
                };
                let req = self.request(
                    self.h1()
                        .post(format!("{}/push", self.url))
                        .timeout(self.push_timeout(body.len()))
                        .header(
                            reqwest::header::CONTENT_TYPE,
                            backhaul_common::api::BATCH_CONTENT_TYPE,
                        )
                        .body(body),
                );
                let push = self.push_once(req, end);
                let id = plan.started(end, Instant::now());
                let started = Instant::now();
                pushes.push(async move {
                    let outcome = push.await;
                    observe(&metrics().exchange_seconds, "push", started.elapsed());
                    (outcome, id)
                });
            }
            let (outcome, id) = tokio::select! {
                Some(o) = pushes.next() => o,
                _ = notified, if plan.has_room() => continue,
                _ = sleep_until_some(plan.timer()) => {
                    if plan.on_timer(Instant::now()) {
                        debug!(
                            "a push is stuck (pending over {:?}); sending again from the relay's ack",
                            plan.stuck_after().unwrap_or_default()
                        );
                        pushes.clear();
                    }
                    continue;
                }
                _ = self.done.cancelled() => return Spell::Shutdown,
            };
            let (end, why) = match outcome {
                PushOutcome::LinkGone(why) => return Spell::LinkGone(why),
                PushOutcome::Taken { all } => (PushEnd::Taken { all }, None),
                PushOutcome::Cut(why) => (PushEnd::Cut, Some(why)),
                PushOutcome::Failed(why) => (PushEnd::Failed, Some(why)),
            };
            let (lost, retry) = plan.finished(id, end, Instant::now());
            if let Some(why) = &why {
                log_retry("push", why, retry);
            }
            if lost {
                // Sending starts again from the relay's ack: the pushes in flight carry nothing
                // that will not go again, and one stalled on a dead connection would only hold
                // its place until its timeout.
                pushes.clear();
            }
        }
    }

    /// One push of the frames up to `end`.
    async fn push_once(&self, req: reqwest::RequestBuilder, end: u64) -> PushOutcome {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if cut_mid_way(&e) => {
                self.closed_under_us(&e);
                return PushOutcome::Cut(describe(&e));
            }
            Err(e) => return PushOutcome::Failed(describe(&e)),
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return PushOutcome::LinkGone(LINK_GONE.into());
        }
        let status = resp.status();
        if !status.is_success() {
            let body = body::error_text(resp).await;
            return PushOutcome::Failed(format!("relay answered {status}: {body}"));
        }
        // The answer is a batch header (the relay's ack); allow what a batch may be.
        let limit = backhaul_common::transport::max_message(self.info.max_batch_bytes as usize);
        let body = match body::read_limited(resp, limit, "a push").await {
            Ok(b) => b,
            Err(e) => return PushOutcome::Failed(e.to_string()),
        };
        match decode_batch(&body) {
            Ok((h, _)) => match lock(&self.out).ack(h.ack) {
                Ok(()) => PushOutcome::Taken { all: h.ack >= end },
                Err(e) => PushOutcome::LinkGone(format!("relay sent a bad ack: {e}")),
            },
            Err(e) => PushOutcome::Failed(format!("push response unreadable: {e}")),
        }
    }
}

enum PollOutcome {
    Progress,
    /// Cut after some whole frames arrived: progress, but the rest must be sent again.
    Cut(String),
    /// Cut on an established connection before anything arrived: a path that breaks
    /// exchanges, retried at once for a while.
    CutEarly(String),
    Failed(String),
    LinkGone(String),
}

enum PushOutcome {
    /// The relay took the push in; `all` unless it answered before its turn came.
    Taken {
        all: bool,
    },
    /// Cut on an established connection (see [`cut_mid_way`]).
    Cut(String),
    Failed(String),
    LinkGone(String),
}

impl PollOutcome {
    fn failed(e: &reqwest::Error) -> Self {
        if cut_mid_way(e) {
            Self::CutEarly(describe(e))
        } else {
            Self::Failed(describe(e))
        }
    }
}

/// Logs how a failed poll or push goes again.
fn log_retry(what: &str, why: &str, retry: Option<Retry>) {
    match retry {
        Some(Retry::AtOnce) => debug!("{what} failed ({why}); retrying at once"),
        Some(Retry::AfterCut) => debug!("{what} cut ({why}); sending again at once"),
        Some(Retry::Paused(d)) => warn!("{what} to relay failed ({why}); retrying in {d:?}"),
        None => {}
    }
}
