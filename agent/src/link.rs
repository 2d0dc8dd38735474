//! One registered link to the relay and the sessions it serves. The link's frames travel over one
//! of three transports (see [`crate::transport`]): a stream (WebSocket or HTTP/2) that carries
//! batches both ways, or the long-poll pair of a poll loop that brings frames in and a push loop
//! that sends them out. Every transport resends from the peer's last ack after a cut, so the
//! link survives broken connections and changes of transport without loss or duplication (see
//! `common::reliable`).

use crate::body;
use crate::longpoll::{
    Poll, PollEnd, PollPlan, PushEnd, PushPlan, Retry, BUSY_POLLS, MIN_PUSH_BATCH, RETRY_INITIAL,
    RETRY_MAX,
};
use crate::transport::{Ended, Ladder, Next, Transport};
use crate::{Clients, Config};
use backhaul_common::api::{LinkInfo, OpenRequest, Opened};
use backhaul_common::api::{BACKEND_SECRET_HEADER, FORWARDED_HEADERS};
use backhaul_common::backoff::Backoff;
use backhaul_common::dial::{bearer_headers, dial, DialOptions, Dialed};
use backhaul_common::reliable::{Arrival, RecvState, Reorder, SendBuffer, StreamCursor};
use backhaul_common::secret;
use backhaul_common::session::{new_session, pump, FrameSink, SessionHandle, WsSide};
use backhaul_common::transport::{
    recv_within, write_batches, BatchRx, BatchTx, ChannelTx, ChunkRx, ChunkSource,
};
use backhaul_common::wire::{decode_batch, BatchHeader, BatchReader, Frame, Kind};
use backhaul_common::ws::Role;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Extra time a poll may take beyond the relay's hold time before the agent gives up on it.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// Longest a push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest a push body may cross, in bytes per second, before it is given up (1 Mbit/s;
/// on slower paths, pushes shrink until they fit).
const MIN_PUSH_RATE: usize = 128 * 1024;
/// Kept connections closed under a request after which polls and pushes stop keeping them.
const FRESH_AFTER_CLOSES: u32 = 3;
/// Longest the relay may take to accept a stream.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest limit [`within_relay_patience`] sets.
const MIN_LIMIT: Duration = Duration::from_millis(500);
/// The close reason (code 1014) a client gets when the agent could not reach the backend,
/// unless `--report-backend-errors` lets it say why.
pub const BACKEND_UNAVAILABLE: &str = "backend unavailable";

/// The close reason for a session whose backend could not be reached: the error itself only
/// when the operator allows it (`--report-backend-errors`), since it names hosts and ports of
/// the private network and tells open ports from closed ones.
pub fn backend_failure_reason(report: bool, error: &dyn std::fmt::Display) -> String {
    if report {
        format!("agent could not reach backend: {error:#}")
    } else {
        BACKEND_UNAVAILABLE.to_string()
    }
}

/// `limit`, cut to half the time the relay keeps a link without hearing from its agent
/// (`agent_timeout_ms`, 0 if the relay did not say), so that a request hanging on a dead
/// connection is abandoned and retried while the relay still holds the link and its sessions.
fn within_relay_patience(limit: Duration, agent_timeout_ms: u64) -> Duration {
    if agent_timeout_ms == 0 {
        return limit;
    }
    limit.min((Duration::from_millis(agent_timeout_ms) / 2).max(MIN_LIMIT))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the poll loop, the push loop and the sessions of one link.
pub struct Link {
    cfg: Arc<Config>,
    client: reqwest::Client,
    /// HTTP/1.1 client that opens a connection per request, used once the path has closed
    /// kept connections under us [`FRESH_AFTER_CLOSES`] times.
    client_fresh: reqwest::Client,
    closed_under_us: std::sync::atomic::AtomicU32,
    /// HTTP/2-only client for the http2 transport.
    client_h2: reqwest::Client,
    info: LinkInfo,
    url: String,
    out: Mutex<SendBuffer>,
    out_notify: Notify,
    /// The poll loop's receive position, sent as the ack in pushes too.
    down_ack: AtomicU64,
    /// The latest round of polls (see `Link::polls`).
    poll_round: AtomicU64,
    sessions: Mutex<HashMap<u32, Arc<SessionHandle>>>,
    /// Cancelled when the link is over (relay forgot it, or shutdown).
    done: CancellationToken,
    /// The transport that last carried the link.
    carrier: Mutex<Option<Transport>>,
    /// Batch sizes on streams, agent -> relay and relay -> agent. A batch counts only when
    /// whole, so a path that cuts connections after N bytes needs batches under N: each is
    /// halved after a break, and grows again with evidence that batches get through (acks for
    /// ours, see `StreamCursor`; whole batches received for the relay's, which it learns from the
    /// stream URL).
    up_batch: std::sync::atomic::AtomicUsize,
    down_batch: std::sync::atomic::AtomicUsize,
}

struct Sink(Arc<Link>);

impl FrameSink for Sink {
    fn send(&self, frame: Frame) {
        self.0.send(frame);
    }
}

impl Link {
    pub fn new(
        cfg: Arc<Config>,
        clients: &Clients,
        info: LinkInfo,
        shutdown: &CancellationToken,
    ) -> Arc<Self> {
        let url = format!(
            "{}{}/{}",
            cfg.relay_base(),
            backhaul_common::api::LINKS_PATH,
            info.link
        );
        let max_batch = info.max_batch_bytes as usize;
        Arc::new(Self {
            cfg,
            client: clients.h1.clone(),
            client_fresh: clients.h1_fresh.clone(),
            closed_under_us: std::sync::atomic::AtomicU32::new(0),
            client_h2: clients.h2.clone(),
            info,
            url,
            out: Mutex::new(SendBuffer::new()),
            out_notify: Notify::new(),
            down_ack: AtomicU64::new(0),
            poll_round: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            done: shutdown.child_token(),
            carrier: Mutex::new(None),
            up_batch: std::sync::atomic::AtomicUsize::new(max_batch),
            down_batch: std::sync::atomic::AtomicUsize::new(max_batch),
        })
    }

    fn send(&self, frame: Frame) {
        lock(&self.out).push(frame);
        self.out_notify.notify_one();
    }

    /// The HTTP/1.1 client for polls and pushes: the pooled one, until the path has shown that
    /// it closes connections after each answer (tinyproxy does, without saying
    /// `Connection: close`). Reusing such a connection loses the request sent on it just as
    /// the close arrives; a new connection per request never does.
    fn h1(&self) -> &reqwest::Client {
        if self.closed_under_us.load(Ordering::Relaxed) >= FRESH_AFTER_CLOSES {
            &self.client_fresh
        } else {
            &self.client
        }
    }

    /// Notes a request lost because its kept connection closed as it was sent.
    fn closed_under_us(&self, e: &reqwest::Error) {
        // hyper's words for a connection that closed before any answer (IncompleteMessage).
        if !describe(e).contains("connection closed before message completed") {
            return;
        }
        let n = self.closed_under_us.fetch_add(1, Ordering::Relaxed) + 1;
        if n == FRESH_AFTER_CLOSES {
            info!(
                "the path to the relay closed kept connections under {n} requests (a proxy without keep-alive?); opening a new connection for each request from now on"
            );
        }
    }

    fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cfg.agent_token {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, secret::bearer(t)),
            None => req,
        }
    }

    /// Runs the link until the relay forgets it or shutdown; returns why it ended. Moves between
    /// transports as `--transport` allows: down the ladder when one is refused or keeps breaking,
    /// back to the top now and then.
    pub async fn run(self: Arc<Self>) -> String {
        let tracker = TaskTracker::new();
        let mut recv = RecvState::new();
        let mut ladder = Ladder::new(self.cfg.transport);
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let why = loop {
            let transport = ladder.current();
            let note = ladder.note();
            let spell = match transport {
                Transport::LongPoll => {
                    self.longpoll(&mut recv, &tracker, ladder.retry_faster_after(), &note)
                        .await
                }
                Transport::WebSocket | Transport::Http2 => {
                    self.stream(transport, &mut recv, &tracker, &note).await
                }
            };
            let ended = match spell {
                Spell::LinkGone(why) => break why,
                Spell::Shutdown => break "shutting down".to_string(),
                Spell::Ended(ended) => ended,
            };
            // What failed and why, for the log.
            let (what, why) = match &ended {
                Ended::Refused(why) => (format!("{transport} connection"), why.clone()),
                Ended::Broken { why, .. } => (format!("{transport} stream"), why.clone()),
                Ended::TryFaster => (String::new(), String::new()),
            };
            match ladder.ended(ended) {
                Next::BackToTop => info!("trying faster transports to the relay again"),
                Next::FallBack { warning } => {
                    warn!("{warning}");
                    backoff.reset();
                }
                Next::Retry { reset_backoff } => {
                    if reset_backoff {
                        // It worked until it broke: reconnect at once.
                        backoff.reset();
                    }
                    if !self.pause_after_failure(&mut backoff, &what, &why).await {
                        break "shutting down".to_string();
                    }
                }
            }
        };
        self.done.cancel();
        let sessions: Vec<(u32, Arc<SessionHandle>)> = lock(&self.sessions).drain().collect();
        for (id, handle) in sessions {
            handle.terminate(Frame::close(id, 1001, "agent lost its link to the relay"));
        }
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            warn!("some sessions did not close within 5 s after the link ended");
        }
        why
    }

    /// Carries the link over long-poll until it ends, or until `retry_faster` has passed.
    async fn longpoll(
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

    /// Opens a stream on `transport` and carries the link over it until it breaks.
    async fn stream(
        self: &Arc<Self>,
        transport: Transport,
        recv: &mut RecvState,
        tracker: &TaskTracker,
        note: &str,
    ) -> Spell {
        let ack = recv.ack();
        let spell = async {
            match transport {
                Transport::WebSocket => match self.connect_ws(ack).await {
                    Ok((tx, rx)) => self.drive(transport, tx, rx, recv, tracker, note).await,
                    Err(spell) => spell,
                },
                Transport::Http2 | Transport::LongPoll => match self.connect_h2(ack).await {
                    Ok((tx, rx)) => self.drive(transport, tx, rx, recv, tracker, note).await,
                    Err(spell) => spell,
                },
            }
        };
        tokio::select! {
            spell = spell => spell,
            _ = self.done.cancelled() => Spell::Shutdown,
        }
    }

    fn stream_url(&self, scheme_for_ws: bool, what: &str, ack: u64) -> String {
        let batch = self.down_batch.load(Ordering::Relaxed);
        let mut url = format!("{}/{what}?ack={ack}&batch={batch}", self.url);
        if scheme_for_ws {
            if let Some(rest) = url.strip_prefix("http") {
                url = format!("ws{rest}");
            }
        }
        url
    }

    /// Longest a stream may take to be set up.
    fn setup_limit(&self) -> Duration {
        within_relay_patience(STREAM_SETUP_TIMEOUT, self.info.agent_timeout_ms)
    }

    /// How long a push of `len` bytes may take: the relay may hold it for its turn up to the
    /// poll hold time, then its body must cross at no less than [`MIN_PUSH_RATE`]. A push that
    /// stalls on a dead connection is given up after that, and sent again.
    fn push_timeout(&self, len: usize) -> Duration {
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        let transfer = Duration::from_secs_f64(len as f64 / MIN_PUSH_RATE as f64);
        (hold + self.grace() + transfer).min(PUSH_TIMEOUT)
    }

    /// How long past the relay's hold time a poll's answer, or the relay's heartbeat on a
    /// stream, may be late before the agent gives up on the connection and tries a new one.
    fn grace(&self) -> Duration {
        within_relay_patience(POLL_GRACE, self.info.agent_timeout_ms)
    }

    async fn connect_ws(
        &self,
        ack: u64,
    ) -> Result<
        (
            backhaul_common::transport::WsTx<WriteHalf<RelayStream>>,
            backhaul_common::transport::WsRx<ReadHalf<RelayStream>>,
        ),
        Spell,
    > {
        let url = self.stream_url(true, "ws", ack);
        let url =
            url::Url::parse(&url).map_err(|e| Spell::refused(format!("bad URL {url}: {e}")))?;
        let opts = DialOptions {
            timeout: self.setup_limit(),
            tls: self.cfg.tls.clone(),
            use_env_proxy: true,
            headers: bearer_headers(self.cfg.agent_token.as_ref()),
            ..DialOptions::default()
        };
        match dial(&url, &opts).await {
            Ok(Dialed { io, .. }) => Ok(backhaul_common::transport::ws_halves(
                io,
                Role::Client,
                self.info.max_batch_bytes as usize,
            )),
            Err(backhaul_common::dial::DialError::Http { status: 404, .. }) => {
                Err(Spell::LinkGone(LINK_GONE.into()))
            }
            Err(e) => Err(Spell::refused(e.to_string())),
        }
    }

    async fn connect_h2(&self, ack: u64) -> Result<(ChannelTx, ChunkRx<ResponseChunks>), Spell> {
        let (tx, chunks) = ChannelTx::new();
        let body = futures_util::StreamExt::map(chunks, Ok::<_, std::io::Error>);
        let req = self.request(
            self.client_h2
                .post(self.stream_url(false, "stream", ack))
                .header(
                    reqwest::header::CONTENT_TYPE,
                    backhaul_common::api::BATCH_STREAM_CONTENT_TYPE,
                )
                .body(reqwest::Body::wrap_stream(body)),
        );
        let limit = self.setup_limit();
        let resp = match tokio::time::timeout(limit, req.send()).await {
            Err(_) => return Err(Spell::refused(format!("no answer within {limit:?}"))),
            Ok(Err(e)) => return Err(Spell::refused(describe(&e))),
            Ok(Ok(r)) => r,
        };
        if let Some(PollOutcome::LinkGone(why)) = link_gone(&resp) {
            return Err(Spell::LinkGone(why));
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body::error_text(resp).await;
            return Err(Spell::refused(format!("relay answered {status}: {body}")));
        }
        let max_batch = self.info.max_batch_bytes as usize;
        Ok((tx, ChunkRx::new(ResponseChunks(resp), max_batch)))
    }

    /// Carries the link over an open stream: one task half reads the relay's batches and hands
    /// their frames on, the other sends ours, each frame once, until the stream breaks.
    async fn drive<T: BatchTx, R: BatchRx>(
        self: &Arc<Self>,
        transport: Transport,
        mut tx: T,
        mut rx: R,
        recv: &mut RecvState,
        tracker: &TaskTracker,
        note: &str,
    ) -> Spell {
        let started = Instant::now();
        self.announce_transport(transport, note);
        let mut progressed = false;
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        let (start_tx, start_rx) = oneshot::channel::<u64>();
        let reader = async {
            let mut start_tx = Some(start_tx);
            loop {
                let batch = recv_within(&mut rx, hold + self.grace(), "relay").await?;
                let header = match self.absorb(batch, recv, tracker) {
                    Ok(h) => h,
                    Err(why) => return Ok(Spell::LinkGone(why)),
                };
                if let Some(start) = start_tx.take() {
                    // The relay's first batch says where its receiving stands: resume from there.
                    let _ = start.send(header.ack);
                    progressed = true;
                }
                if header.first_seq < recv.ack() {
                    let max = self.info.max_batch_bytes as usize;
                    let _ =
                        self.down_batch
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                Some((b * 2).min(max))
                            });
                }
                self.down_ack.store(recv.ack(), Ordering::Release);
                self.out_notify.notify_one();
            }
        };
        let writer = async {
            let Ok(from) = start_rx.await else {
                return std::future::pending::<String>().await;
            };
            let mut cursor = StreamCursor::new(
                from,
                self.up_batch.load(Ordering::Relaxed),
                self.info.max_batch_bytes as usize,
            );
            let woken = || self.out_notify.notified();
            write_batches(&mut tx, hold, false, woken, |force| {
                let ack = self.down_ack.load(Ordering::Acquire);
                let next = cursor.next_batch(&lock(&self.out), ack, force);
                self.up_batch.store(cursor.limit(), Ordering::Relaxed);
                Ok(next)
            })
            .await
        };
        let why = tokio::select! {
            r = reader => match r {
                Ok(spell) => return spell,
                Err(why) => why,
            },
            why = writer => why,
        };
        for batch in [&self.up_batch, &self.down_batch] {
            let _ = batch.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b / 2).max(MIN_PUSH_BATCH))
            });
        }
        Spell::Ended(Ended::Broken {
            why,
            lasted: started.elapsed(),
            progressed,
        })
    }

    /// Takes in one whole batch from a stream. `Err` when the relay broke the protocol.
    fn absorb(
        self: &Arc<Self>,
        batch: Bytes,
        recv: &mut RecvState,
        tracker: &TaskTracker,
    ) -> Result<BatchHeader, String> {
        let mut reader = BatchReader::from_message(batch);
        let header = match reader.header() {
            Ok(Some(h)) => h,
            Ok(None) => return Err("relay sent a batch without a header".into()),
            Err(e) => return Err(format!("relay sent a bad batch: {e}")),
        };
        lock(&self.out)
            .ack(header.ack)
            .map_err(|e| format!("relay sent a bad ack: {e}"))?;
        self.take_frames(&mut reader, recv, tracker)?;
        reader
            .finish()
            .map_err(|e| format!("relay sent a bad batch: {e}"))
    }

    /// Hands on every whole frame `reader` holds, in order, dropping retransmitted ones. `Err`
    /// when the relay broke the protocol.
    fn take_frames(
        self: &Arc<Self>,
        reader: &mut BatchReader,
        recv: &mut RecvState,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        while let Some((seq, frame)) = reader
            .next_frame()
            .map_err(|e| format!("relay sent a bad batch: {e}"))?
        {
            match recv.arrive(seq) {
                Ok(Arrival::Deliver) => self.dispatch(frame, tracker),
                Ok(Arrival::Duplicate) => {}
                Err(e) => return Err(format!("relay broke the protocol: {e}")),
            }
        }
        Ok(())
    }

    /// Like [`Link::take_frames`], for batches that may arrive out of order (long-poll).
    fn take_frames_reordered(
        self: &Arc<Self>,
        reader: &mut BatchReader,
        reorder: &Mutex<Reorder>,
        tracker: &TaskTracker,
    ) -> Result<(), String> {
        while let Some((seq, frame)) = reader
            .next_frame()
            .map_err(|e| format!("relay sent a bad batch: {e}"))?
        {
            lock(reorder).arrive(seq, frame, |f| self.dispatch(f, tracker));
        }
        Ok(())
    }

    /// Says on stdout (for people and scripts) and in the log which transport carries the link,
    /// when it changes; reconnections on the same transport are only logged at debug level.
    fn announce_transport(&self, transport: Transport, note: &str) {
        let changed = lock(&self.carrier).replace(transport) != Some(transport);
        if changed {
            backhaul_common::telemetry::announce(&format!(
                "backhaul-agent: link to the relay carried over {transport} ({note})"
            ));
            info!("link to the relay carried over {transport} ({note})");
        } else {
            debug!("link to the relay reconnected over {transport}");
        }
    }

    /// Tells the relay this link is going away (best effort, on shutdown).
    pub async fn deregister(&self) {
        let req = self.request(
            self.client
                .delete(&self.url)
                .timeout(Duration::from_secs(2)),
        );
        if let Err(e) = req.send().await {
            debug!("could not deregister from the relay: {e}");
        }
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
                polls.push(async move { (poll.await, round, started) });
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
        if let Some(gone) = link_gone(&resp) {
            return (gone, 0);
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
                    let out = lock(&self.out);
                    let from = from.max(out.base());
                    if !out.has_from(from) {
                        break;
                    }
                    // A push body is one buffer: a proxy may need its length up front.
                    let (batch, n) =
                        out.encode_batch(from, self.down_ack.load(Ordering::Acquire), limit);
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
                pushes.push(async move { (push.await, id) });
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

    /// After a failed connection: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff, until the instant returned.
    fn pause_after(&self, backoff: &mut Backoff, what: &str, why: &str) -> Option<Instant> {
        if backoff.attempts() == 0 {
            debug!("{what} failed ({why}); retrying at once");
            backoff.next_delay();
            return None;
        }
        let d = backoff.next_delay();
        warn!("{what} to relay failed ({why}); retrying in {d:?}");
        Some(Instant::now() + d)
    }

    /// After a failed connection: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff. False if the link ended meanwhile.
    async fn pause_after_failure(&self, backoff: &mut Backoff, what: &str, why: &str) -> bool {
        let Some(until) = self.pause_after(backoff, what, why) else {
            return true;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => true,
            _ = self.done.cancelled() => false,
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

    /// Hands one in-order frame from the relay to its session, or opens a session.
    fn dispatch(self: &Arc<Self>, frame: Frame, tracker: &TaskTracker) {
        let id = frame.session;
        if frame.kind == Kind::Open {
            self.open(id, frame.payload, tracker);
            return;
        }
        let mut sessions = lock(&self.sessions);
        let Some(handle) = sessions.get(&id).cloned() else {
            return; // ended here first; late frames are dropped
        };
        // A CLOSE leaves the handle in place: the session lives on until its pump has finished
        // the close handshake (and takes window credit meanwhile).
        if let Err(v) = handle.deliver(frame) {
            warn!(session.id = id, "dropping session: relay {v}");
            handle.terminate(Frame::close(id, 1011, "relay broke flow control"));
            sessions.remove(&id);
            drop(sessions);
            self.send(Frame::abort(id, "flow control violated"));
        }
    }

    fn open(self: &Arc<Self>, id: u32, payload: Bytes, tracker: &TaskTracker) {
        let open: OpenRequest = match serde_json::from_slice(&payload) {
            Ok(o) => o,
            Err(e) => {
                warn!(session.id = id, "relay sent an unreadable OPEN: {e}");
                self.send(Frame::close(
                    id,
                    1002,
                    "agent could not read the session request",
                ));
                return;
            }
        };
        let windows = backhaul_common::window::WindowConfig {
            initial: self.info.window,
            max: self.info.max_window.max(self.info.window),
            budget: self.cfg.window_budget.clone(),
        };
        let (handle, peer) = new_session(id, &windows);
        {
            let mut sessions = lock(&self.sessions);
            if sessions.len() >= self.cfg.max_sessions {
                drop(sessions);
                warn!(
                    session.id = id,
                    "refusing session: at the limit of {} (--max-sessions)", self.cfg.max_sessions
                );
                self.send(Frame::close(id, 1013, "agent is at its session limit"));
                return;
            }
            if sessions.contains_key(&id) {
                warn!(
                    session.id = id,
                    "relay reused a live session id; ignoring the OPEN"
                );
                return;
            }
            sessions.insert(id, Arc::new(handle));
        }
        let link = self.clone();
        let span = tracing::info_span!(
            "session",
            session.id = id,
            client.addr = open.client_addr.as_deref().unwrap_or("-")
        );
        tracker.spawn(
            async move {
                let url = match backhaul_common::api::backend_url(&link.cfg.backend, &open.path) {
                    Ok(u) => u,
                    Err(e) => {
                        warn!("refusing a session for a path outside --backend: {e}");
                        link.send(Frame::close(
                            id,
                            1008,
                            &format!("agent refused the session: {e}"),
                        ));
                        lock(&link.sessions).remove(&id);
                        return;
                    }
                };
                let mut headers = forwardable(open.headers);
                if let Some(s) = &link.cfg.backend_secret {
                    headers.push((BACKEND_SECRET_HEADER.to_string(), s.expose().to_string()));
                }
                let dial_opts = DialOptions {
                    timeout: link.cfg.connect_timeout,
                    tls: link.cfg.tls.clone(),
                    protocols: open.protocols.clone(),
                    // HTTP(S)_PROXY is for reaching the relay; the backend is local.
                    use_env_proxy: false,
                    headers,
                };
                match dial(&url, &dial_opts).await {
                    Ok(Dialed { io, protocol }) => {
                        debug!("connected to backend {url}");
                        let opened = serde_json::to_vec(&Opened { protocol }).unwrap_or_default();
                        link.send(Frame::new(Kind::Opened, 0, id, Bytes::from(opened)));
                        let side = WsSide {
                            role: Role::Client,
                            max_message: link.cfg.max_message,
                        };
                        let summary = pump(io, side, peer, Arc::new(Sink(link.clone()))).await;
                        info!(
                            bytes.to_backend = summary.received,
                            bytes.from_backend = summary.sent,
                            "session ended: {}",
                            summary.ending
                        );
                    }
                    Err(e) => {
                        // The span names the session; the client's close reason may not.
                        warn!("agent could not reach backend {url}: {e:#}");
                        let reason = backend_failure_reason(link.cfg.report_backend_errors, &e);
                        link.send(Frame::close(id, 1014, &reason));
                    }
                }
                lock(&link.sessions).remove(&id);
            }
            .instrument(span),
        );
    }
}

type RelayStream = backhaul_common::dial::WsIo;

/// The relay's OPEN headers that the agent passes on: only [`FORWARDED_HEADERS`], whatever the
/// relay sent. So a client can never supply [`BACKEND_SECRET_HEADER`], which is not among them.
fn forwardable(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(name, _)| {
            let ok = FORWARDED_HEADERS.contains(&name.to_ascii_lowercase().as_str());
            if !ok {
                debug!("not passing header {name:?} from the relay to the backend");
            }
            ok
        })
        .collect()
}

/// How a spell on one transport ended.
enum Spell {
    /// The link is over: the relay forgot it, or broke the protocol. Register again.
    LinkGone(String),
    Shutdown,
    /// The transport ended and the link goes on, on this one or another (see [`Ladder`]).
    Ended(Ended),
}

impl Spell {
    fn refused(why: String) -> Self {
        Spell::Ended(Ended::Refused(why))
    }
}

const LINK_GONE: &str =
    "the relay no longer knows this link (it restarted, or gave up on this agent)";

/// A streaming response body as a source of chunks for [`ChunkRx`].
struct ResponseChunks(reqwest::Response);

impl ChunkSource for ResponseChunks {
    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.0.chunk().await.map_err(|e| describe(&e))
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

/// Whether an exchange broke on a connection that had been made (reset or closed half-way, as
/// proxies and NATs do), rather than failing to connect or timing out.
fn cut_mid_way(e: &reqwest::Error) -> bool {
    !e.is_connect() && !e.is_timeout() && (e.is_request() || e.is_body())
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

/// Completes at `at`, or never.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn link_gone(resp: &reqwest::Response) -> Option<PollOutcome> {
    (resp.status() == reqwest::StatusCode::NOT_FOUND)
        .then(|| PollOutcome::LinkGone(LINK_GONE.into()))
}

/// Error text with its causes, which reqwest otherwise hides.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_reach_clients_only_when_allowed() {
        let e = "could not connect to 10.1.2.3:5432: Connection refused (os error 111)";
        assert_eq!(backend_failure_reason(false, &e), "backend unavailable");
        assert_eq!(
            backend_failure_reason(true, &e),
            format!("agent could not reach backend: {e}")
        );
    }

    #[test]
    fn only_forwarded_headers_pass_never_the_backend_secret() {
        let from_relay = vec![
            ("origin".to_string(), "https://app.example".to_string()),
            ("X-Backhaul-Secret".to_string(), "forged".to_string()),
            ("x-backhaul-secret".to_string(), "forged".to_string()),
            ("x-private".to_string(), "no".to_string()),
        ];
        assert_eq!(
            forwardable(from_relay),
            vec![("origin".to_string(), "https://app.example".to_string())]
        );
    }

    #[test]
    fn limits_stay_within_the_relays_patience() {
        // The default relay keeps a quiet link for 5 s: give up on a hung request after 2.5 s.
        assert_eq!(
            within_relay_patience(STREAM_SETUP_TIMEOUT, 5000),
            Duration::from_millis(2500)
        );
        // A patient relay does not stretch the agent's own limit.
        assert_eq!(
            within_relay_patience(STREAM_SETUP_TIMEOUT, 600_000),
            STREAM_SETUP_TIMEOUT
        );
        // An impatient one does not cut it below what a handshake needs.
        assert_eq!(within_relay_patience(POLL_GRACE, 200), MIN_LIMIT);
        // A relay that does not say keeps the agent's limits.
        assert_eq!(within_relay_patience(POLL_GRACE, 0), POLL_GRACE);
    }
}
