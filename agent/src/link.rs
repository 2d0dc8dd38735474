//! One registered link to the relay and the sessions it serves. The link's frames travel over one
//! of three transports (see [`crate::transport`]): a stream (WebSocket or HTTP/2) that carries
//! batches both ways, or the long-poll pair of a poll loop that brings frames in and a push loop
//! that sends them out. Every transport resends from the peer's last ack after a cut, so the
//! link survives broken connections and changes of transport without loss or duplication (see
//! `common::reliable`).

use crate::body;
use crate::transport::{Transport, QUICK_BREAKS_BEFORE_FALLBACK, RETRY_FASTER_AFTER, STABLE_AFTER};
use crate::{Clients, Config};
use backhaul_common::api::{LinkInfo, OpenRequest, Opened};
use backhaul_common::api::{BACKEND_SECRET_HEADER, FORWARDED_HEADERS};
use backhaul_common::backoff::Backoff;
use backhaul_common::dial::{bearer_headers, dial, DialOptions, Dialed};
use backhaul_common::reliable::{Arrival, RecvState, SendBuffer, StreamCursor};
use backhaul_common::secret;
use backhaul_common::session::{new_session, pump, FrameSink, SessionHandle, WsSide};
use backhaul_common::transport::{
    recv_within, write_batches, BatchRx, BatchTx, ChannelTx, ChunkRx, ChunkSource,
};
use backhaul_common::wire::{decode_batch, BatchHeader, BatchReader, Frame, Kind};
use backhaul_common::ws::Role;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Extra time a poll may take beyond the relay's hold time before the agent gives up on it.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// Longest a push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delays for a poll or push that failed twice in a row (the first retry is immediate).
const RETRY_INITIAL: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Smallest push batch the agent shrinks to after failed pushes.
const MIN_PUSH_BATCH: usize = 16 * 1024;
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
    /// HTTP/2-only client for the http2 transport.
    client_h2: reqwest::Client,
    info: LinkInfo,
    url: String,
    out: Mutex<SendBuffer>,
    out_notify: Notify,
    /// The poll loop's receive position, sent as the ack in pushes too.
    down_ack: AtomicU64,
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
            client_h2: clients.h2.clone(),
            info,
            url,
            out: Mutex::new(SendBuffer::new()),
            out_notify: Notify::new(),
            down_ack: AtomicU64::new(0),
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
        let ladder = self.cfg.transport.ladder();
        let mut rung = 0;
        let mut quick_breaks = 0;
        // Why the link is not on the fastest transport, for the log.
        let mut fell_back: Option<String> = None;
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let why = loop {
            let transport = ladder[rung];
            let next = ladder.get(rung + 1).copied();
            let note = match (&fell_back, ladder.len()) {
                (Some(why), _) => format!("fallback: {why}"),
                (None, 1) => "forced by --transport".to_string(),
                (None, _) => "the fastest transport".to_string(),
            };
            let spell = match transport {
                Transport::LongPoll => {
                    let retry_faster = (rung > 0).then_some(RETRY_FASTER_AFTER);
                    self.longpoll(&mut recv, &tracker, retry_faster, &note)
                        .await
                }
                Transport::WebSocket | Transport::Http2 => {
                    self.stream(transport, &mut recv, &tracker, &note).await
                }
            };
            // What failed, why, and (warning, reason) when it is time to move down the ladder.
            let (what, why, fall_back) = match spell {
                Spell::LinkGone(why) => break why,
                Spell::Shutdown => break "shutting down".to_string(),
                Spell::TryFaster => {
                    info!("trying faster transports to the relay again");
                    rung = 0;
                    quick_breaks = 0;
                    fell_back = None;
                    continue;
                }
                Spell::Refused(why) => {
                    let fall_back = next.map(|next| {
                        (
                            format!("{transport} transport to the relay is not available ({why}); falling back to {next}"),
                            format!("{transport} not available: {why}"),
                        )
                    });
                    (format!("{transport} connection"), why, fall_back)
                }
                Spell::Broken {
                    why,
                    lasted,
                    progressed,
                } => {
                    if lasted >= STABLE_AFTER {
                        quick_breaks = 0;
                    } else {
                        quick_breaks += 1;
                    }
                    if progressed {
                        // It worked until it broke: reconnect at once.
                        backoff.reset();
                    }
                    let fall_back = next
                        .filter(|_| quick_breaks >= QUICK_BREAKS_BEFORE_FALLBACK)
                        .map(|next| {
                            (
                                format!("{transport} transport to the relay broke {quick_breaks} times within {STABLE_AFTER:?} of connecting (last: {why}); falling back to {next}"),
                                format!("{transport} kept breaking: {why}"),
                            )
                        });
                    (format!("{transport} stream"), why, fall_back)
                }
            };
            match fall_back {
                Some((warning, reason)) => {
                    warn!("{warning}");
                    fell_back = Some(reason);
                    rung += 1;
                    quick_breaks = 0;
                }
                None => {
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
        tokio::select! {
            spell = self.poll_loop(recv, tracker) => spell,
            spell = self.push_loop() => spell,
            _ = deadline => Spell::TryFaster,
        }
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
            backhaul_common::transport::WsTx<RelayStream>,
            backhaul_common::transport::WsRx<RelayStream>,
        ),
        Spell,
    > {
        let url = self.stream_url(true, "ws", ack);
        let url =
            url::Url::parse(&url).map_err(|e| Spell::Refused(format!("bad URL {url}: {e}")))?;
        let opts = DialOptions {
            timeout: self.setup_limit(),
            tls: self.cfg.tls.clone(),
            use_env_proxy: true,
            headers: bearer_headers(self.cfg.agent_token.as_ref()),
            ..DialOptions::default()
        };
        match dial(&url, &opts).await {
            Ok(Dialed { io, .. }) => {
                let config =
                    backhaul_common::transport::link_ws_config(self.info.max_batch_bytes as usize);
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    io,
                    tokio_tungstenite::tungstenite::protocol::Role::Client,
                    Some(config),
                )
                .await;
                Ok(backhaul_common::transport::ws_halves(ws))
            }
            Err(backhaul_common::dial::DialError::Http { status: 404, .. }) => {
                Err(Spell::LinkGone(LINK_GONE.into()))
            }
            Err(e) => Err(Spell::Refused(e.to_string())),
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
            Err(_) => return Err(Spell::Refused(format!("no answer within {limit:?}"))),
            Ok(Err(e)) => return Err(Spell::Refused(describe(&e))),
            Ok(Ok(r)) => r,
        };
        if let Some(PollOutcome::LinkGone(why)) = link_gone(&resp) {
            return Err(Spell::LinkGone(why));
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body::error_text(resp).await;
            return Err(Spell::Refused(format!("relay answered {status}: {body}")));
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
        Spell::Broken {
            why,
            lasted: started.elapsed(),
            progressed,
        }
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

    async fn poll_loop(self: &Arc<Self>, recv: &mut RecvState, tracker: &TaskTracker) -> Spell {
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let hold = Duration::from_millis(self.info.poll_hold_ms);
        // One batch, which may exceed the batch size by a frame.
        let limit = backhaul_common::transport::max_message(self.info.max_batch_bytes as usize);
        loop {
            let url = format!("{}/poll?ack={}", self.url, recv.ack());
            let req = self.request(self.client.get(url).timeout(hold + self.grace()));
            let outcome = tokio::select! {
                r = self.poll_once(req, recv, limit, tracker) => r,
                _ = self.done.cancelled() => return Spell::Shutdown,
            };
            self.down_ack.store(recv.ack(), Ordering::Release);
            match outcome {
                PollOutcome::Progress => backoff.reset(),
                PollOutcome::LinkGone(why) => return Spell::LinkGone(why),
                PollOutcome::Failed(why) => {
                    if !self.pause_after_failure(&mut backoff, "poll", &why).await {
                        return Spell::Shutdown;
                    }
                }
            }
        }
    }

    async fn poll_once(
        self: &Arc<Self>,
        req: reqwest::RequestBuilder,
        recv: &mut RecvState,
        limit: usize,
        tracker: &TaskTracker,
    ) -> PollOutcome {
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return PollOutcome::Failed(describe(&e)),
        };
        if let Some(gone) = link_gone(&resp) {
            return gone;
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let body = body::error_text(resp).await;
            return PollOutcome::Failed(format!("relay answered {status}: {body}"));
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
                    return if got_any {
                        PollOutcome::Progress
                    } else {
                        PollOutcome::Failed(why)
                    };
                }
            };
            received += chunk.len();
            if received > limit {
                return PollOutcome::Failed(format!(
                    "poll response over {limit} bytes; is something between agent and relay rewriting traffic?"
                ));
            }
            reader.push(&chunk);
            match reader.header() {
                Ok(Some(h)) if !got_any => {
                    if let Err(e) = lock(&self.out).ack(h.ack) {
                        return PollOutcome::LinkGone(format!("relay sent a bad ack: {e}"));
                    }
                    got_any = true;
                }
                Ok(_) => {}
                Err(e) => return PollOutcome::LinkGone(format!("relay sent a bad batch: {e}")),
            }
            if let Err(why) = self.take_frames(&mut reader, recv, tracker) {
                return PollOutcome::LinkGone(why);
            }
        }
        match reader.finish() {
            Ok(_) => PollOutcome::Progress,
            Err(e) if got_any => {
                debug!("poll response ended early: {e}");
                PollOutcome::Progress
            }
            Err(e) => PollOutcome::Failed(format!("poll response ended early: {e}")),
        }
    }

    async fn push_loop(self: &Arc<Self>) -> Spell {
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let max_batch = self.info.max_batch_bytes as usize;
        // Shrinks after failures so pushes get through paths that cut long requests, and grows
        // back after successes.
        let mut batch_limit = max_batch;
        loop {
            let notified = self.out_notify.notified();
            let body = {
                let out = lock(&self.out);
                if out.is_empty() {
                    None
                } else {
                    let mut buf = BytesMut::new();
                    out.encode_batch(
                        out.base(),
                        self.down_ack.load(Ordering::Acquire),
                        batch_limit,
                        &mut buf,
                    );
                    Some(buf.freeze())
                }
            };
            let Some(body) = body else {
                tokio::select! {
                    _ = notified => continue,
                    _ = self.done.cancelled() => return Spell::Shutdown,
                }
            };
            let req = self.request(
                self.client
                    .post(format!("{}/push", self.url))
                    .timeout(PUSH_TIMEOUT)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        backhaul_common::api::BATCH_CONTENT_TYPE,
                    )
                    .body(body),
            );
            let outcome = tokio::select! {
                r = self.push_once(req) => r,
                _ = self.done.cancelled() => return Spell::Shutdown,
            };
            match &outcome {
                PollOutcome::Progress => batch_limit = (batch_limit * 2).min(max_batch),
                _ => batch_limit = (batch_limit / 2).max(MIN_PUSH_BATCH),
            }
            match outcome {
                PollOutcome::Progress => backoff.reset(),
                PollOutcome::LinkGone(why) => return Spell::LinkGone(why),
                PollOutcome::Failed(why) => {
                    if !self.pause_after_failure(&mut backoff, "push", &why).await {
                        return Spell::Shutdown;
                    }
                }
            }
        }
    }

    /// After a failed poll or push: the first retry goes at once (a proxy cutting a connection
    /// is routine), later ones wait with jittered backoff. False if the link ended meanwhile.
    async fn pause_after_failure(&self, backoff: &mut Backoff, what: &str, why: &str) -> bool {
        if backoff.attempts() == 0 {
            debug!("{what} failed ({why}); retrying at once");
            backoff.next_delay();
            return true;
        }
        let d = backoff.next_delay();
        warn!("{what} to relay failed ({why}); retrying in {d:?}");
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.done.cancelled() => false,
        }
    }

    async fn push_once(&self, req: reqwest::RequestBuilder) -> PollOutcome {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return PollOutcome::Failed(describe(&e)),
        };
        if let Some(gone) = link_gone(&resp) {
            return gone;
        }
        let status = resp.status();
        if !status.is_success() {
            let body = body::error_text(resp).await;
            return PollOutcome::Failed(format!("relay answered {status}: {body}"));
        }
        // The answer is a batch header (the relay's ack); allow what a batch may be.
        let limit = backhaul_common::transport::max_message(self.info.max_batch_bytes as usize);
        let body = match body::read_limited(resp, limit, "a push").await {
            Ok(b) => b,
            Err(e) => return PollOutcome::Failed(e.to_string()),
        };
        match decode_batch(&body) {
            Ok((h, _)) => match lock(&self.out).ack(h.ack) {
                Ok(()) => PollOutcome::Progress,
                Err(e) => PollOutcome::LinkGone(format!("relay sent a bad ack: {e}")),
            },
            Err(e) => PollOutcome::Failed(format!("push response unreadable: {e}")),
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
    /// The transport could not be set up (a proxy refused it, or the relay does not offer it).
    Refused(String),
    /// The transport carried the link for `lasted`, then broke; `progressed` if it carried any
    /// batch at all.
    Broken {
        why: String,
        lasted: Duration,
        progressed: bool,
    },
    /// Time to try the faster transports again.
    TryFaster,
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
    Failed(String),
    LinkGone(String),
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
